"""StudyMates: another film of the same study, drawn as a second view's source."""

from __future__ import annotations

from collections import Counter

import torch

from bonecluster.study_mates import StudyMates

# Positions 0..6: study 5 holds {0, 3, 6}, study 2 holds {1, 4}, studies 7 and 9 one film each.
STUDIES = [5, 2, 7, 5, 2, 9, 5]


def draw(mates, positions, p, seed=0):
    return mates.partners(torch.tensor(positions), p, torch.Generator().manual_seed(seed))


def test_counts_the_films_that_share_their_study():
    assert StudyMates(STUDIES).films_with_mates == 5


def test_with_p_one_every_film_with_a_mate_gets_another_film_of_its_study():
    mates = StudyMates(STUDIES)
    positions = list(range(7)) * 50
    partners = draw(mates, positions, 1.0).tolist()
    for pos, partner in zip(positions, partners):
        if pos in (2, 5):   # alone in its study
            assert partner == pos
        else:
            assert partner != pos and STUDIES[partner] == STUDIES[pos]


def test_mates_are_drawn_uniformly_among_the_other_films_of_the_study():
    partners = draw(StudyMates(STUDIES), [0] * 4000, 1.0)
    counts = Counter(partners.tolist())
    assert set(counts) == {3, 6}
    assert abs(counts[3] - 2000) < 150    # binomial sd ~32


def test_p_zero_keeps_every_film_and_p_half_swaps_about_half():
    mates = StudyMates(STUDIES)
    assert draw(mates, [0, 1, 3] * 10, 0.0).tolist() == [0, 1, 3] * 10
    swapped = (draw(mates, [0] * 4000, 0.5) != 0).float().mean().item()
    assert 0.45 < swapped < 0.55


def test_draws_the_same_random_numbers_whatever_p_and_the_studies():
    """Later augmentations must not depend on p or on which films have mates."""
    for studies, p in ((STUDIES, 0.3), (list(range(7)), 1.0)):
        g = torch.Generator().manual_seed(1)
        StudyMates(studies).partners(torch.arange(7), p, g)
        after = torch.rand(1, generator=g)
        reference = torch.Generator().manual_seed(1)
        torch.rand(14, generator=reference, dtype=torch.float64)
        assert torch.equal(after, torch.rand(1, generator=reference))


def test_same_generator_state_gives_the_same_partners():
    mates = StudyMates(STUDIES)
    assert torch.equal(draw(mates, list(range(7)), 0.5, seed=3), draw(mates, list(range(7)), 0.5, seed=3))
