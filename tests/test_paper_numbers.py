"""Paper numbers: He et al. 2015 Tables 3-4 top-1/top-5 keyed by configuration."""

from resnet_jax.analysis import paper_numbers as pn


def test_table3_top5_and_table4_multiscale_numbers_match_configuration():
  assert pn.paper_top5_error('imagenet2012', 'residual', 152, None) == (5.71, 'Table 3')
  assert pn.paper_top5_error('imagenet2012', 'plain', 34, 'B') == (10.02, 'Table 3')
  assert pn.paper_top5_error('imagenet2012', 'residual', 18, 'A') is None  # Table 2: top-1 only
  assert pn.paper_top5_error('cifar10', 'residual', 34, 'A') is None
  expected = {
    (34, 'B'): (21.84, 5.71),
    (34, 'C'): (21.53, 5.60),
    (50, 'B'): (20.74, 5.25),
    (101, 'B'): (19.87, 4.60),
    (152, 'B'): (19.38, 4.49),
  }
  for (depth, shortcut), errors in expected.items():
    got = pn.paper_multiscale_error('imagenet2012', 'residual', depth, shortcut)
    assert got == (errors, 'Table 4')
  assert pn.paper_multiscale_error('imagenet2012', 'residual', 34, 'A') is None
  # Every Table 3 row has both columns; Table 4 numbers beat their 10-crop Table 3 counterparts.
  assert set(pn.IMAGENET_TOP5) == {
    k for k, (_, src) in pn.IMAGENET_TABLES.items() if src.endswith('3') or k == ('plain', 34, None)
  }
  for key, ((top1, top5), _) in pn.IMAGENET_TABLE4.items():
    assert top1 < pn.IMAGENET_TABLES[key][0] and top5 < pn.IMAGENET_TOP5[key][0]


def test_he_2016_cifar_medians_are_still_served():
  assert pn.paper_error('cifar100', 'residual', 164, 'B', True, 'bottleneck') == (
    24.33,
    'He et al. 2016, Table 3',
  )
