"""Cell weighers: among the cells that passed the filters, which is best.

A weigher is an entry point in the ``cellagent.scheduler.weighers`` group,
named like its module, and ``[scheduler] weighers`` lists the names. As
with filters, the scheduler constructs each once, with no arguments, sets
its ``name``, and passes everything else per decision in the ``Selection``;
a weigher keeps no state between decisions.

**Contract.** ``weigh_all(cells, selection)`` returns one raw weight (a
float, larger = better before the multiplier) per cell, in the order of
``cells``. The base class calls ``weigh(cell, selection)`` per cell; a
weigher only writes that unless it can do better for the whole list.
Raw weights are in the weigher's own unit (free units, seconds, an
operator's offset); the scheduler makes them comparable:

1. **Normalise per request.** Each weigher's raw weights are mapped to
   0..1 by ``(raw - min) / (max - min)`` over *this decision's* candidates
   (all 0 when they are equal), by ``normalize`` below. Nova kept min and
   max on the weigher object and only ever widened them (bug 1870096,
   reference 5.3), so one odd cell seen hours ago squashed every later
   decision; a weigher here has no such memory.
2. **Multiply.** The normalised weight is multiplied by the weigher's
   multiplier: ``multipliers[weigher.multiplier_key]`` given to the
   ``Scheduler`` (``[scheduler] *_weight_multiplier``), or the weigher's
   ``default_multiplier`` when the key is absent. A negative multiplier
   turns "more is better" into "less is better" (stacking for RAM); 0
   switches the weigher off.
3. **Sum.** A cell's weight is the sum over the weighers. With one
   candidate nothing is weighed (every weight is 0), as in nova.

Because of the normalisation, one weigher can move a cell by at most its
multiplier: the stock ``ram`` (10.0) outweighs ``offset`` (1.0) however
large an operator's ``weight_offset`` is, exactly as in nova (raise
``offset_weight_multiplier`` to make the offset decide).
"""


class BaseCellWeigher:
    """Base class of the cell weighers; see the module docstring."""

    #: The entry-point name; set by the scheduler when it loads the weigher.
    name = "weigher"
    #: Key of this weigher's multiplier in ``Scheduler(multipliers=...)``.
    multiplier_key = None
    #: Multiplier when the key is not given.
    default_multiplier = 1.0

    def weigh_all(self, cells, selection):
        """Raw weights of ``cells``, in order."""
        weigh = self.weigh
        return [weigh(cell, selection) for cell in cells]

    def weigh(self, cell, selection):
        """Raw weight of one cell (larger is better before the multiplier)."""
        raise NotImplementedError()


def normalize(values):
    """Map ``values`` to 0..1 by (v - min) / (max - min); all 0 when they are equal."""
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [0.0] * len(values)
    span = hi - lo
    return [(v - lo) / span for v in values]
