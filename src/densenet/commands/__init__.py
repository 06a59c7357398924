"""The command line's commands, one module each, above the library code they call (``densenet.cli`` routes).

A command module turns flags into a call of a library function (``densenet.training.train.train``,
``densenet.training.evaluate.evaluate_weights``, ``densenet.deploy.predict.predict``, ...) and prints its result;
nothing below this package imports it.
"""
