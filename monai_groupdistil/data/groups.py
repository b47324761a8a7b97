"""MapGroupNamesd: group names in a datalist (``"H0"``, ``"Siemens"``) to the integer ids the losses and metrics take.

MONAI's ``MapLabelValued`` maps numeric arrays only; a datalist's group is often a name.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["MapGroupNamesd"]


class MapGroupNamesd(MapTransform):
    """Replace the group name under each key by its index in ``names``, as an int64 0-dim tensor.

    The losses, metrics and handlers of this package take integer group ids in ``[0, num_groups)``; a datalist
    usually names the group (a hospital, a vendor). Put this transform in the preprocessing of every split, with
    the same ``names``, so that an id means the same group everywhere and ``group_names=names`` labels the logs
    and reports. A value that is already an integer id in range is kept.

    Args:
        keys: keys of the group names, e.g. ``"group"``.
        names: the group names; the id of ``names[i]`` is ``i``.
        allow_missing_keys: don't raise for a missing key.

    Raises:
        ValueError: for duplicated ``names``; at call time for a name not in ``names`` (the key, the value and
            the known names are given) or an integer id outside ``[0, len(names))``.

    Example::

        >>> from monai_groupdistil.data import MapGroupNamesd
        >>> to_ids = MapGroupNamesd("group", names=["H0", "H1", "H2"])
        >>> int(to_ids({"image": "a.nii.gz", "group": "H2"})["group"])
        2
    """

    def __init__(self, keys: KeysCollection, names: Sequence[str], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.names = [str(n) for n in names]
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"names must be distinct group names (at least one), got {self.names}.")
        self.ids = {name: i for i, name in enumerate(self.names)}

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.tensor(self._id(key, d[key]), dtype=torch.long)
        return d

    def _id(self, key: Hashable, value: object) -> int:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.names):
                return value
            raise ValueError(f"'{key}' holds the id {value}, outside [0, {len(self.names)}) for names {self.names}.")
        if str(value) not in self.ids:
            raise ValueError(
                f"'{key}' holds the group {value!r}, which is not one of the names {self.names}; add it to `names` "
                "or fix the datalist."
            )
        return self.ids[str(value)]
