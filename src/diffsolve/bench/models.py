"""Model specs of the bench (``name[@w]``): see ``diffsolve.hub.spec``."""
from ..hub.spec import class_labels, load_spec, parse_spec

__all__ = ["class_labels", "load_spec", "parse_spec"]
