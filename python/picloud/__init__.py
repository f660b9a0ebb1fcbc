"""picloud: run Python functions as jobs on a university cluster.

This package is the Python side of picloud: today the warm worker process that
the node agent starts (``python -m picloud.worker``), the frame codec it speaks
(``picloud._wire``) and the encoded-value format for arguments and results
(``picloud._payload``); see docs/workers.md. The client API comes later.

Importing ``picloud`` stays cheap on purpose: no numpy, no cloudpickle here.
"""

__version__ = "0.1.0"
