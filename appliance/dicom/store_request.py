"""What a C-STORE request must agree with before ingest looks at its data set.

pynetdicom serves every C-STORE by the storage service, whichever
presentation context it comes on, so an instance of one SOP class would be
stored from a context negotiated for another (Verification, say):
:func:`context_mismatch` says when the request's SOP class is not its
context's.
"""

from __future__ import annotations

from pydicom.uid import UID

# Refused: SOP Class not supported (PS3.7 9.1.1.1.9 b): the request names a
# SOP class this end does not store on that presentation context. Not
# 0xA900, which says the data set does not match the SOP class (it may
# match the one named perfectly); nor 0x0212 Mistyped argument, which is
# for a parameter not agreed on the association (the class may well be
# agreed on another of its contexts).
SOP_CLASS_NOT_SUPPORTED = 0x0122
SOP_CLASS_COMMENT = "SOP class is not the presentation context's abstract syntax"


def context_mismatch(context_id: int, abstract_syntax: str, sop_class: str) -> str:
    """Why a C-STORE for ``sop_class`` is refused on presentation context
    ``context_id``, negotiated for ``abstract_syntax``; "" when they agree.

    A presentation context carries the messages of its abstract syntax
    (PS3.8 7.1.1.13), and a storage SOP class is negotiated as an abstract
    syntax of its own. The appliance accepts no SOP Class Common Extended
    Negotiation (pynetdicom's default), so no context stands for related
    general classes either.
    """
    if str(sop_class) == str(abstract_syntax):
        return ""
    return (
        f"SOP class {_named(sop_class)} on presentation context {context_id}, "
        f"negotiated for {_named(abstract_syntax)}"
    )


def _named(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid
