"""Study and patient ids: the one check every reader, the label store and the review server use.

Ids become folder and file names of the results and of the label store, so an id must be a
safe name (the pattern and length of ``identifier`` in ``metsflow/schemas/studies.schema.yaml``,
read from there so the sheet's schema stays their one owner) and must not be a name the layout
itself uses beside per-study folders (``metsflow.core.layout.RESERVED_NAMES``): a study called
``shards`` had the shard manifests' folder as its output folder, and running it deleted
``s0000.tsv`` (issue #25).

Names derived from DICOM PatientIDs or BIDS labels go through ``sanitise_id``, and
``derived_ids`` reports two source names that would become one folder, per source name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import yaml

from metsflow.core.config import SCHEMA_DIR
from metsflow.core.layout import RESERVED_NAMES

_IDENTIFIER = yaml.safe_load((SCHEMA_DIR / "studies.schema.yaml").read_text())["definitions"][
    "identifier"
]
SAFE_ID = re.compile(_IDENTIFIER["pattern"])
MAX_ID_LENGTH = int(_IDENTIFIER["maxLength"])
_RESERVED = {name.casefold() for name in RESERVED_NAMES}
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def id_problems(value: object, what: str = "study id") -> list[str]:
    """Why ``value`` cannot be a study/patient id (empty when it can)."""
    if not isinstance(value, str) or not value:
        return [f"{what} is empty"]
    if len(value) > MAX_ID_LENGTH:
        return [f"{what} {value[:40]!r}... is {len(value)} characters (at most {MAX_ID_LENGTH})"]
    # fullmatch: the schema pattern ends in "$", which re.match lets a trailing newline through.
    if not SAFE_ID.fullmatch(value):
        return [
            f"{what} {value!r} is not a safe folder name: letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        ]
    if value.casefold() in _RESERVED:
        return [
            f"{what} {value!r} is a name the results layout uses itself "
            f"({', '.join(sorted(RESERVED_NAMES))}); rename it"
        ]
    return []


def is_safe_id(value: object) -> bool:
    return not id_problems(value)


def check_id(value: object, what: str = "study id") -> str:
    """``value`` when it is a valid id, else ``ValueError`` saying why."""
    problems = id_problems(value, what)
    if problems:
        raise ValueError(problems[0])
    return value  # type: ignore[return-value]


def sanitise_id(value: str, reserved: Iterable[str] = ()) -> str | None:
    """A safe id made from a source name (DICOM PatientID, BIDS label): runs of other characters
    become ``_``, leading ``.``/``_``/``-`` are dropped; None when nothing usable is left or the
    result is a reserved name (of the layout, or ``reserved``: an output folder's own files)."""
    name = _UNSAFE_CHARACTERS.sub("_", str(value).strip()).lstrip("._-")[:MAX_ID_LENGTH]
    extra = {r.casefold() for r in reserved}
    if not name or id_problems(name) or name.casefold() in extra:
        return None
    return name


def derived_ids(
    sources: Iterable[str], reserved: Iterable[str] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """(source -> id, source -> problem) for source names; a source whose id is unusable or is
    also the id of another source (``A B`` and ``A_B``; ``P1`` and ``p1`` on a case-folding
    share) gets a problem naming the others, and no id: nothing is merged."""
    reserved = list(reserved)
    made: dict[str, str] = {}
    problems: dict[str, str] = {}
    owners: dict[str, list[str]] = {}
    for source in dict.fromkeys(sources):
        name = sanitise_id(source, reserved)
        if name is None:
            problems[source] = (
                f"{source!r} gives no usable id (empty, or a name the output folder uses: "
                f"{', '.join(sorted({*RESERVED_NAMES, *reserved}))})"
            )
            continue
        made[source] = name
        owners.setdefault(name.casefold(), []).append(source)
    for sources_of_name in owners.values():
        if len(sources_of_name) > 1:
            for source in sources_of_name:
                others = ", ".join(repr(o) for o in sources_of_name if o != source)
                problems[source] = (
                    f"{source!r} and {others} would share the folder {made[source]!r}; "
                    "none of them is imported (make the source ids distinct)"
                )
                del made[source]
    return made, problems
