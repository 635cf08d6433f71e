"""One module per page of the main window (Model, Corpus, Training, Run, Runs)."""
