"""Data: the text corpus and tokenizer (``corpus``) and the grain loader that feeds each
process its rows (``loader``)."""
