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


def test_table6_and_tables2_3_top1_numbers_are_the_papers():
  """DESIGN.md's 'Paper numbers to test against', served by configuration: CIFAR-10 Table 6
  (option A residual nets only) and ImageNet 10-crop top-1 of Tables 2-3."""
  table6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
  for depth, err in table6.items():
    assert pn.paper_error('cifar10', 'residual', depth, 'A') == (err, 'Table 6')
    assert pn.paper_error('cifar10', 'residual', depth, None) == (err, 'Table 6')  # A: default
    assert pn.paper_error('cifar10', 'residual', depth, 'B') is None
    assert pn.paper_error('cifar10', 'plain', depth, None) is None  # plain nets: Fig. 6 only
    assert pn.paper_error('cifar100', 'residual', depth, 'A') is None
  imagenet = {
    ('plain', 18, None): 27.94,
    ('plain', 34, None): 28.54,
    ('residual', 18, 'A'): 27.88,
    ('residual', 34, 'A'): 25.03,
    ('residual', 34, 'B'): 24.52,
    ('residual', 34, 'C'): 24.19,
    ('residual', 50, 'B'): 22.85,
    ('residual', 101, 'B'): 21.75,
    ('residual', 152, 'B'): 21.43,
  }
  for (variant, depth, shortcut), err in imagenet.items():
    got = pn.paper_error('imagenet2012', variant, depth, shortcut)
    assert got is not None and got[0] == err, (variant, depth, shortcut)
  assert pn.paper_error('imagenet2012', 'residual', 50, 'A') is None  # Table 3: 50+ use B
