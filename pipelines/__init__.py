"""One assembly module per technique: a node declares its inputs, calls one function here and returns."""
