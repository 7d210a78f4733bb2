"""The wire package shared by the supervisor and the gateway.

It holds the generated stubs of ``proto/openshell/v1`` (``openshell_wire.v1``), the plain record
types that the rest of the code works with (``records``) and the conversion between the two at
the edge (``convert``). The supervisor and the gateway never import each other; this package is
everything they share, and it imports neither of them.
"""

__version__ = "0.1.0"
