"""Keypoint schemes (sapiens_lite/keypoints): COCO-17, COCO-WholeBody-133, Sapiens/Goliath-308, and
schemes defined by a JSON file (checked field by field; registered from a checkpoint's definition)."""

from __future__ import annotations

import json
import re

import pytest

from sapiens_lite import keypoints
from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import (
    canonical_name,
    get_scheme,
    register_scheme,
    scheme_for_num_keypoints,
    scheme_from_dict,
)

SCHEMES = {"coco17": 17, "coco_wholebody133": 133, "goliath308": 308}
COCO17 = (
    "nose left_eye right_eye left_ear right_ear left_shoulder right_shoulder left_elbow right_elbow "
    "left_wrist right_wrist left_hip right_hip left_knee right_knee left_ankle right_ankle"
).split()
SIDE = {"left": "right", "right": "left", "l": "r", "r": "l"}


def side_tokens(name: str) -> list[str]:
    return [t for t in name.split("_") if t in SIDE]


@pytest.fixture(params=list(SCHEMES))
def scheme(request):
    return get_scheme(request.param)


def test_sizes_and_per_keypoint_lists(scheme):
    k = SCHEMES[scheme.name]
    assert scheme.num_keypoints == k
    for field in ("names", "flip_index", "sigmas", "joint_weights", "keypoint_colors", "keypoint_types"):
        assert len(getattr(scheme, field)) == k, field
    assert len(set(scheme.names)) == k, "names must be unique"
    assert all(0 < s < 0.2 for s in scheme.sigmas)
    assert all(w > 0 for w in scheme.joint_weights)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in scheme.keypoint_colors)
    assert set(scheme.keypoint_types) <= {"upper", "lower", ""}
    assert scheme.upper_body_ids and scheme.lower_body_ids


def test_flip_index_is_an_involution_and_a_permutation(scheme):
    flip = scheme.flip_index
    assert sorted(flip) == list(range(scheme.num_keypoints))
    assert all(flip[flip[i]] == i for i in range(scheme.num_keypoints))  # flipping twice = identity


def _group(name: str) -> str:
    """The name without its point number: l_midpoint_2_of_upper_lash_line -> l_midpoint__of_upper_lash_line."""
    return re.sub(r"\d+", "", name)


# goliath308.json pairs the numbered eye/ear contour points by position within their group (l_midpoint_2 of a lash
# line -> r_midpoint_1), where Sapiens' goliath.py pairs them by name; it also swaps the eyebrow / lip points that
# Sapiens maps to themselves. So for 308 the check is: the side swaps and the point stays on the same contour.
@pytest.mark.parametrize("name", list(SCHEMES))
def test_flip_swaps_left_and_right_names(name):
    scheme = get_scheme(name)
    exact = name != "goliath308"
    checked = 0
    for i, kp in enumerate(scheme.names):
        other = scheme.names[scheme.flip_index[i]]
        prefix = kp.split("_")[0]
        if prefix in SIDE:  # left_x <-> right_x, l_x <-> r_x
            want = SIDE[prefix] + kp[len(prefix) :]
            assert (other == want) if exact else (_group(other) == _group(want)), (kp, other)
            checked += 1
        elif side_tokens(kp):  # e.g. end_of_r_eyebrow <-> end_of_l_eyebrow
            assert side_tokens(other) == [SIDE[t] for t in side_tokens(kp)], (kp, other)
            assert _group(other).replace("_l_", "_r_") == _group(kp).replace("_l_", "_r_"), (kp, other)
            checked += 1
        elif not kp.startswith("face-"):  # midline points stay (WholeBody face points have no side names)
            assert other == kp or not exact, (kp, other)
    assert checked >= 16


def test_skeleton_indices_and_colors(scheme):
    assert scheme.skeleton and len(scheme.skeleton_colors) == len(scheme.skeleton)
    for a, b in scheme.skeleton:
        assert 0 <= a < scheme.num_keypoints and 0 <= b < scheme.num_keypoints and a != b


def test_coco_order_is_the_prefix_of_wholebody():
    assert get_scheme("coco17").names == tuple(COCO17)
    assert get_scheme("coco_wholebody133").names[:17] == tuple(COCO17)
    assert get_scheme("coco_wholebody133").names[17:23] == (
        "left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel",
    )  # fmt: skip


def test_goliath308_order_follows_sapiens():
    """Sapiens' 308 channels start with the 15 COCO body points without the wrists, in COCO order;
    then feet, the right hand ending in right_wrist (41), the left hand ending in left_wrist (62)."""
    names = get_scheme("goliath308").names
    assert set(COCO17) <= set(names)
    assert names[:15] == tuple(n for n in COCO17 if not n.endswith("wrist"))
    assert names[15:21] == get_scheme("coco_wholebody133").names[17:23]
    assert names.index("right_wrist") == 41 and names.index("left_wrist") == 62
    assert names[21].startswith("right_thumb") and names[42].startswith("left_thumb")


def test_lookup_by_alias_count_and_name():
    assert get_scheme("coco") == get_scheme("coco17")
    assert get_scheme("wholebody").name == "coco_wholebody133"
    assert get_scheme("sapiens308").name == "goliath308"
    for name, k in SCHEMES.items():
        assert scheme_for_num_keypoints(k).name == name
    s = get_scheme("coco17")
    assert s.index("left_knee") == 13 and s.indices(["nose", "right_ankle"]) == [0, 16]


def test_unknown_scheme_and_keypoint_are_user_errors():
    with pytest.raises(
        UserError, match="unknown keypoint scheme 'mpii'.*coco17.*coco_wholebody133.*goliath308"
    ):
        get_scheme("mpii")
    with pytest.raises(
        UserError, match=r"no built-in keypoint scheme has 21 keypoints \(built-in: 17 \(coco17\)"
    ):
        scheme_for_num_keypoints(21)
    with pytest.raises(UserError, match="'tail' is not in scheme 'coco17'"):
        get_scheme("coco17").index("tail")


# ---- schemes from JSON files ----------------------------------------------------------------------

TOY = {
    "names": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
    "flip_index": [0, 2, 1, 4, 3],
    "sigmas": [0.05, 0.06, 0.06, 0.08, 0.08],
}


@pytest.fixture
def registry(monkeypatch):
    """An empty registry of checkpoint definitions for this test only."""
    monkeypatch.setattr(keypoints, "_REGISTERED", {})
    return keypoints._REGISTERED


def _write(tmp_path, d, name="toy5.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


def test_a_scheme_file_is_a_scheme_with_defaults_for_the_optional_fields(tmp_path):
    path = _write(tmp_path, TOY)
    s = get_scheme(path)
    assert s.name == "toy5" and s.num_keypoints == 5 and s.names[1] == "left_hand"
    assert s.flip_index == (0, 2, 1, 4, 3) and s.sigmas == (0.05, 0.06, 0.06, 0.08, 0.08)
    assert s.joint_weights == (1.0,) * 5 and s.keypoint_types == ("",) * 5
    assert s.skeleton == () and s.skeleton_colors == () and len(s.keypoint_colors) == 5
    assert s.upper_body_ids == [] and s.lower_body_ids == []
    assert canonical_name(path) == path  # a file stays a file (no built-in name for it)
    full = dict(
        TOY,
        scheme="stick",
        num_keypoints=5,
        joint_weights=[1, 1, 1, 1.5, 1.5],
        keypoint_types=["upper", "upper", "upper", "lower", "lower"],
        keypoint_colors=[[255, 0, 0]] * 5,
        skeleton=[[0, 1], [0, 2], [0, 3], [0, 4]],
        skeleton_colors=[[0, 0, 255]] * 4,
    )
    s = get_scheme(_write(tmp_path, full, "other.json"))
    assert s.name == "stick" and s.lower_body_ids == [3, 4] and s.skeleton[2] == (0, 3)
    assert s.joint_weights[3] == 1.5 and s.skeleton_colors[0] == (0, 0, 255)


def test_builtin_schemes_round_trip_through_their_json_form(tmp_path):
    for name in SCHEMES:
        s = get_scheme(name)
        assert scheme_from_dict(s.to_dict(), "x") == s
        assert get_scheme(_write(tmp_path, s.to_dict(), f"{name}_copy.json")) == s  # a file copy: equal


def test_an_edited_file_is_read_again(tmp_path):
    path = _write(tmp_path, TOY)
    assert get_scheme(path).sigmas[0] == 0.05
    (tmp_path / "toy5.json").write_text(json.dumps(dict(TOY, sigmas=[0.1] * 5, joint_weights=[2] * 5)))
    assert get_scheme(path).sigmas == (0.1,) * 5


@pytest.mark.parametrize(
    "change, field, problem",
    [
        ({"flip_index": [0, 2, 1, 4]}, "flip_index", "expected 5 entries"),
        ({"flip_index": [0, 2, 1, 4, 4]}, "flip_index", "not a permutation: index 3 never appears"),
        ({"flip_index": [1, 2, 0, 4, 3]}, "flip_index", "head -> left_hand but left_hand -> right_hand"),
        ({"flip_index": [0, 2, 1, 4, 5]}, "flip_index", r"entry 4 \(right_foot\) is 5"),
        ({"sigmas": [0.05, 0.06, 0.0, 0.08, 0.08]}, "sigmas", "entry 2 .* a positive number"),
        ({"names": ["a", "b", "b", "c", "d"]}, "names", "'b' appears more than once"),
        ({"names": []}, "names", "non-empty list"),
        ({"num_keypoints": 17}, "num_keypoints", "names has 5 entries"),
        ({"skeleton": [[0, 5]]}, "skeleton", r"entry 0 is \[0, 5\]"),
        ({"skeleton": [[1, 1]]}, "skeleton", "two different indices"),
        ({"skeleton": [[0, 1]], "skeleton_colors": []}, "skeleton_colors", "expected 1 entries"),
        ({"keypoint_colors": [[0, 0, 256]] * 5}, "keypoint_colors", "in 0..255"),
        ({"keypoint_types": ["upper"] * 4 + ["leg"]}, "keypoint_types", "entry 4 .*'leg'"),
        ({"joint_weights": [1, 1, 1, 1, -1]}, "joint_weights", "a number >= 0"),
        ({"sigma": [0.1] * 5}, "sigma", "unknown field; valid fields: flip_index"),
        ({"sigmas": None}, "sigmas", "expected 5 entries"),
    ],
)
def test_a_bad_scheme_file_names_the_file_and_the_field(tmp_path, change, field, problem):
    d = {**TOY, **change}
    path = _write(tmp_path, d, "bad.json")
    with pytest.raises(UserError, match=f"bad.json: {field}: .*{problem}"):
        get_scheme(path)


def test_missing_broken_or_incomplete_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere.json: keypoint scheme file not found"):
        get_scheme(str(tmp_path / "nowhere.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        get_scheme(str(tmp_path / "broken.json"))
    no_sigmas = {k: v for k, v in TOY.items() if k != "sigmas"}
    with pytest.raises(UserError, match="incomplete.json: sigmas: missing"):
        get_scheme(_write(tmp_path, no_sigmas, "incomplete.json"))
    with pytest.raises(UserError, match="list.json: expected a JSON object"):
        get_scheme(_write(tmp_path, [1, 2], "list.json"))


def test_a_registered_definition_resolves_without_its_file(tmp_path, registry):
    path = _write(tmp_path, TOY)
    definition = get_scheme(path).to_dict()
    (tmp_path / "toy5.json").unlink()
    with pytest.raises(UserError, match="toy5.json: keypoint scheme file not found"):
        get_scheme(path)
    s = register_scheme(path, definition, source="ckpt/config.json")
    assert get_scheme(path) == s and s.name == "toy5" and canonical_name(path) == path
    assert register_scheme(path, definition, source="again") == s  # the same definition again: fine
    other = dict(definition, sigmas=[0.1] * 5)
    with pytest.raises(UserError, match="other/config.json: keypoint scheme .*toy5.json.* already defined"):
        register_scheme(path, other, source="other/config.json")
    with pytest.raises(
        UserError, match="x/config.json: defines keypoint scheme 'coco17' unlike the built-in"
    ):
        register_scheme("coco17", definition, source="x/config.json")
    # The registered definition wins over a (new, different) file at that path.
    _write(tmp_path, dict(TOY, sigmas=[0.2] * 5))
    assert get_scheme(path).sigmas == s.sigmas


def test_parts_wholebody_ranges_goliath_split_disjoint():
    """COCO-WholeBody's part fields in the 133 order; Goliath's split in Sapiens' GoliathMetric sizes (the
    names rule is checked in tests/finetune/test_evaluate_parts.py); COCO-17 has none."""
    assert get_scheme("coco17").parts == {}
    wb = get_scheme("coco_wholebody133").parts
    assert {p: (ids[0], ids[-1] + 1, len(ids)) for p, ids in wb.items()} == {
        "body": (0, 17, 17),
        "foot": (17, 23, 6),
        "face": (23, 91, 68),
        "lefthand": (91, 112, 21),
        "righthand": (112, 133, 21),
    }
    g = get_scheme("goliath308")
    assert {p: len(ids) for p, ids in g.parts.items()} == {
        "body": 17,
        "foot": 6,
        "face": 238,
        "lefthand": 20,
        "righthand": 20,
    }
    assert [g.names[i] for i in g.parts["body"]] == COCO17
    for scheme in (get_scheme("coco_wholebody133"), g):
        flat = [i for ids in scheme.parts.values() for i in ids]
        assert len(flat) == len(set(flat))
    hash(g)  # still hashable (parts is left out of the hash)


def test_parts_in_a_scheme_file_are_checked(tmp_path):
    s = get_scheme(_write(tmp_path, dict(TOY, parts={"limbs": [1, 2, 3, 4]}), "parts.json"))
    assert s.parts == {"limbs": (1, 2, 3, 4)} and scheme_from_dict(s.to_dict(), "x") == s
    for bad in ({"limbs": [1, 5]}, {"limbs": []}, {"limbs": [1, 1]}, [[1, 2]]):
        with pytest.raises(UserError, match="bad.json: parts: "):
            get_scheme(_write(tmp_path, dict(TOY, parts=bad), "bad.json"))
