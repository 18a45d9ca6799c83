"""Scoring: held-out scores inside training (label likelihood, answer tokens, forgetting), generation over a
decoding grid, the LLM judge, and progress bars for these long loops."""
