"""Reports: figures and tables made from finished run folders (they read results; no
computation module imports them)."""
