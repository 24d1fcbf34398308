"""Device names, xdist placement on GPUs (simulated), and the CUDA paths where a GPU exists."""
import pytest
import torch

import isolation_suite as iso
from isolation_suite.execution import devices
from isolation_suite.spec.scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def test_cpu_and_auto():
    assert devices.normalize(" CPU ") == "cpu"
    assert devices.resolve("auto")[0] == "cpu"
    assert devices.resolve("cpu,cpu") == ["cpu"]


@pytest.mark.parametrize("bad, needle", [("tpu", "unknown device"), ("meta", "unsupported"), ("", "no device")])
def test_bad_devices_name_the_value(bad, needle):
    with pytest.raises(devices.DeviceError, match=needle):
        devices.resolve(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(devices.DeviceError, match="CUDA is not available"):
        devices.normalize("cuda")


def test_workers_spread_over_the_outer_visible_gpus():
    visible = ["2", "5", "7"]
    assert [devices.worker_gpu(f"gw{i}", visible) for i in range(5)] == ["2", "5", "7", "2", "5"]
    assert devices.worker_gpu(None, visible) == "2"
    with pytest.raises(devices.DeviceError, match="no GPU"):
        devices.worker_gpu("gw0", [])


def test_configure_worker_narrows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    threads = torch.get_num_threads()
    try:
        devices.configure_worker("gw1")
        import os
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_configure_worker_leaves_a_plain_run_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    devices.configure_worker(None)
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,4"


def _scenario():
    arch = Architecture((3,), (Layer("fc1", "linear", (("in_features", 3), ("out_features", 3))),
                               Layer("enc", "linear", (("in_features", 3), ("out_features", 2)))),
                        (Op("call", "fc1"), Op("call", "enc")))
    return Scenario(arch, Intent(frozen_modules=("enc",)), OptimizerRecipe("Adam", (("lr", 0.1),)),
                    Data(2, 0, True, "mse"), 2)


@needs_cuda
def test_check_on_cuda_includes_device_parity():
    verdict = iso.check(iso.catalog()["freeze_and_eval"], _scenario(), "cuda")
    assert verdict.ok, str(verdict)
    assert not torch.backends.cuda.matmul.allow_tf32


@needs_cuda
def test_known_bad_is_caught_on_cuda():
    verdict = iso.check(iso.catalog()["no_grad_region"], _scenario(), "cuda")
    assert verdict.first.invariant == "gradient-flows"
