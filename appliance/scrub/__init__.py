"""The scrub: every copy on every tier read back in turn, damage repaired
from another copy, orphans reported."""
