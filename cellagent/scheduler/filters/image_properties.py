"""``image_properties``: the image's hypervisor version requirement (nova's ImagePropertiesFilter).

The image property ``hypervisor_version_requires`` (``">=6.0, <7.0"``, the
body nova gave to distutils' VersionPredicate) is checked against the first
value of the cell's capability ``prominent_hypervisor_version``, with
``packaging`` (distutils is gone from Python 3.12). Cells without that
capability pass, as in nova. A requirement that does not parse removes
every cell (nova's scheduling failed on it too), and so does, for its cell,
a capability value that is not a version.
"""

import functools

from packaging import specifiers
from packaging import version

from cellagent.scheduler import filters

PROPERTY = "hypervisor_version_requires"
CAPABILITY = "prominent_hypervisor_version"


class ImagePropertiesFilter(filters.BaseCellFilter):

    name = "image_properties"

    def filter_all(self, cells, selection):
        wanted = selection.spec.image_properties.get(PROPERTY)
        if not wanted:
            return cells
        wanted = str(wanted)
        try:
            _specifier(wanted)
        except specifiers.InvalidSpecifier:
            for cell in cells:
                selection.remove(self, cell, "image property %s=%r is not a version "
                                             "requirement" % (PROPERTY, wanted))
            return []
        passing = []
        for cell in cells:
            values = cell.capabilities.get(CAPABILITY)
            if not values:
                passing.append(cell)
                continue
            have = sorted(values)[0] if isinstance(values, (set, frozenset)) else values[0]
            ok = _satisfies(wanted, str(have))
            if ok:
                passing.append(cell)
            elif ok is None:
                selection.remove(self, cell, "capability %s=%r is not a version"
                                             % (CAPABILITY, have))
            else:
                selection.remove(self, cell, "hypervisor version %s does not satisfy %s"
                                             % (have, wanted))
        return passing


# Memoised parsers: a deployment has a handful of distinct requirements and
# hypervisor versions, and packaging's parsing costs more than the check.
@functools.lru_cache(maxsize=256)
def _specifier(text):
    return specifiers.SpecifierSet(text)


@functools.lru_cache(maxsize=1024)
def _satisfies(wanted, have):
    """True or False; None when ``have`` is not a version."""
    try:
        return _specifier(wanted).contains(version.Version(have), prereleases=True)
    except version.InvalidVersion:
        return None
