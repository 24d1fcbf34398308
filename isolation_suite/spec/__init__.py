"""The vocabulary: validated scenario specs, layer kinds, optimizer tables, object specs."""
