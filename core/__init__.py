"""The bottom of Pollinate: what every room may import and nothing here imports a room.

- `core.errors`: the errors a user can cause (one line on the CLI, a 4xx over HTTP);
- `core.tensorflow`: importing TensorFlow lazily and quietly;
- `core.console`: the `--home`/`--json` options and where human output goes.
"""
