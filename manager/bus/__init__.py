"""The bus side: the stream listener, trigger matching, dispatch of runs, and the sweeper
of abandoned runs."""
