"""Keypoint schemes (sapiens_lite/keypoints): COCO-17, COCO-WholeBody-133, Sapiens/Goliath-308."""

from __future__ import annotations

import re

import pytest

from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import get_scheme, scheme_for_num_keypoints

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
    with pytest.raises(UserError, match="no keypoint scheme has 21 keypoints"):
        scheme_for_num_keypoints(21)
    with pytest.raises(UserError, match="'tail' is not in scheme 'coco17'"):
        get_scheme("coco17").index("tail")
