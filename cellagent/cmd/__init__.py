"""Console entry points. The only place that parses config and exits."""

import warnings


def init_threading():
    """Select oslo.service's threading backend before oslo.messaging loads.

    oslo.service 4.x would otherwise load its eventlet backend on the first
    import of oslo.messaging. cellagent never uses eventlet; it may still be
    installed as a dependency of a dependency, and importing it prints a
    deprecation warning, silenced here.
    """
    warnings.filterwarnings("ignore", message=r"(?s)\s*eventlet is deprecated")
    from oslo_service import backend
    backend.init_backend(backend.BackendType.THREADING)
