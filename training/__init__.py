"""Training and evaluation of the two-stage PE model on the RSNA-STR layout."""
