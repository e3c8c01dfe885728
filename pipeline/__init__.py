"""Configuration, workspace, stage bookkeeping and the command line of CLAD."""
