"""The stages (extract, train, evaluate) and the pieces they are built from."""
