"""The base every stage may import (and which imports none of them): facts and helpers shared by train/, export/,
space/ and scripts/."""
