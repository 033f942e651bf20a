"""The ``lorite`` subcommands, one module each: ``add_parser(sub)`` registers the subcommand's options and
sets ``func`` to its ``run(args)``. :mod:`lorite.cli` builds the parser from :data:`COMMANDS`, in this order
(the order ``lorite --help`` lists them). A new subcommand is a module here and an entry below."""

from . import analyze, compare, demo, evaluate, federate, finetune, grow, pretrain, quantize

COMMANDS = (finetune, compare, evaluate, demo, pretrain, analyze, grow, quantize, federate)
