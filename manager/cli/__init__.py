"""The operator's and the author's command line (a client of the API, plus local commands)."""
