"""Real-image K/V recorded from an INVERSION: the reference store, its byte budget and its release."""
