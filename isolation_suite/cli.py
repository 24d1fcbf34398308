def main(argv=None):
    raise SystemExit("isolation-suite: not built yet")
