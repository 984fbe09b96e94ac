"""CamVid facts: the 11 classes, void, the palette, and the two on-disk layouts.

These are the facts of one dataset; code takes its classes from a ``segray.classes.ClassTable``,
whose default ``segray.classes.CAMVID`` is built from here.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
NUM_CLASSES: int = len(CLASSES)  # 11 real classes
VOID_INDEX: int = 11  # ignored by the loss and by every metric
VOID_NAME: str = "Void"

# Colours of the 11 classes (+ void last), as in the SegNet tutorial's CamVid palette.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),  # Sky
    (128, 0, 0),  # Building
    (192, 192, 128),  # Pole
    (128, 64, 128),  # Road
    (60, 40, 222),  # Pavement
    (128, 128, 0),  # Tree
    (192, 128, 128),  # SignSymbol
    (64, 64, 128),  # Fence
    (64, 0, 128),  # Car
    (64, 64, 0),  # Pedestrian
    (0, 128, 192),  # Bicyclist
    (0, 0, 0),  # Void
)
VOID_COLOR: tuple[int, int, int] = PALETTE[VOID_INDEX]

# --- The original release: 32 colour-coded classes (label_colors.txt) grouped into the 11 ---
# Grouping used by the SegNet authors (Badrinarayanan et al.) and most CamVid-11 papers.
ORIGINAL_COLORS: tuple[tuple[tuple[int, int, int], str], ...] = (
    ((64, 128, 64), "Animal"),
    ((192, 0, 128), "Archway"),
    ((0, 128, 192), "Bicyclist"),
    ((0, 128, 64), "Bridge"),
    ((128, 0, 0), "Building"),
    ((64, 0, 128), "Car"),
    ((64, 0, 192), "CartLuggagePram"),
    ((192, 128, 64), "Child"),
    ((192, 192, 128), "Column_Pole"),
    ((64, 64, 128), "Fence"),
    ((128, 0, 192), "LaneMkgsDriv"),
    ((192, 0, 64), "LaneMkgsNonDriv"),
    ((128, 128, 64), "Misc_Text"),
    ((192, 0, 192), "MotorcycleScooter"),
    ((128, 64, 64), "OtherMoving"),
    ((64, 192, 128), "ParkingBlock"),
    ((64, 64, 0), "Pedestrian"),
    ((128, 64, 128), "Road"),
    ((128, 128, 192), "RoadShoulder"),
    ((0, 0, 192), "Sidewalk"),
    ((192, 128, 128), "SignSymbol"),
    ((128, 128, 128), "Sky"),
    ((64, 128, 192), "SUVPickupTruck"),
    ((0, 0, 64), "TrafficCone"),
    ((0, 64, 64), "TrafficLight"),
    ((192, 64, 128), "Train"),
    ((128, 128, 0), "Tree"),
    ((192, 128, 192), "Truck_Bus"),
    ((64, 0, 64), "Tunnel"),
    ((192, 192, 0), "VegetationMisc"),
    ((0, 0, 0), "Void"),
    ((64, 192, 0), "Wall"),
)

# original class name -> index of the 11 classes (VOID_INDEX for Void). Documented in README.
ORIGINAL_TO_11: dict[str, int] = {
    "Sky": 0,
    "Building": 1, "Archway": 1, "Bridge": 1, "Tunnel": 1, "Wall": 1,
    "Column_Pole": 2, "TrafficCone": 2,
    "Road": 3, "LaneMkgsDriv": 3, "LaneMkgsNonDriv": 3,
    "Sidewalk": 4, "ParkingBlock": 4, "RoadShoulder": 4,
    "Tree": 5, "VegetationMisc": 5,
    "SignSymbol": 6, "Misc_Text": 6, "TrafficLight": 6,
    "Fence": 7,
    "Car": 8, "SUVPickupTruck": 8, "Truck_Bus": 8, "Train": 8, "OtherMoving": 8,
    "Pedestrian": 9, "Child": 9, "CartLuggagePram": 9, "Animal": 9,
    "Bicyclist": 10, "MotorcycleScooter": 10,
    "Void": VOID_INDEX,
}  # fmt: skip


def format_label_colors(colors=ORIGINAL_COLORS) -> str:
    """Text of a ``label_colors.txt``: one ``R G B<TAB>Name`` a line."""
    return "".join(f"{r} {g} {b}\t{name}\n" for (r, g, b), name in colors)


def parse_label_colors(text: str, source: str = "label_colors.txt") -> dict[tuple[int, int, int], int]:
    """Parse ``label_colors.txt`` into colour -> 11-class index.

    Raises ValueError naming the line for malformed lines or class names outside the table.
    """
    table: dict[tuple[int, int, int], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 4 or not all(f.isdigit() for f in fields[:3]):
            raise ValueError(f"{source}:{lineno}: expected 'R G B Name', got {line!r}")
        rgb = tuple(int(f) for f in fields[:3])
        name = " ".join(fields[3:])
        if name not in ORIGINAL_TO_11:
            known = ", ".join(sorted(ORIGINAL_TO_11))
            raise ValueError(f"{source}:{lineno}: unknown CamVid class {name!r}; known: {known}")
        table[rgb] = ORIGINAL_TO_11[name]  # type: ignore[index]
    if not table:
        raise ValueError(f"{source}: no colours found")
    return table
