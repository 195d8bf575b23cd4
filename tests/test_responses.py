"""Fig. 7 analysis: which layers are measured, and the plot (the restore path is covered end to end
in tests/test_sweep.py on a real tiny run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from resnet_jax.analysis import responses
from resnet_jax.models import create_model


def _param_shapes(name: str, size: int, **kw):
  model = create_model(name, **kw)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))[
    'params'
  ]


@pytest.mark.parametrize(
  'name,size,expected',
  [
    ('resnet20', 32, 19),  # 3x3 stem + 18 block convs (option A: no projections)
    ('resnet18', 64, 16),  # 7x7 stem excluded; 8 basic blocks x 2
    ('resnet50', 64, 16),  # one 3x3 per bottleneck; 1x1 convs and projections excluded
  ],
)
def test_response_layers_are_the_bns_after_3x3_convs(name, size, expected):
  layers = responses.response_layers(_param_shapes(name, size))
  assert len(layers) == expected
  if name == 'resnet20':
    assert layers[:3] == [('bn1',), ('layer1_0', 'bn1'), ('layer1_0', 'bn2')]
    assert layers[-1] == ('layer3_2', 'bn2')
  if name == 'resnet50':
    assert all(l[-1] == 'bn2' for l in layers)


def test_response_layers_of_plain_twin_match_residual():
  assert responses.response_layers(
    _param_shapes('resnet20', 32, shortcut='C')
  ) == responses.response_layers(_param_shapes('resnet20', 32, residual=False))


def test_plot_responses(tmp_path):
  results = [
    {
      'label': 'plain-8',
      'residual': False,
      'depth': 8,
      'dataset': 'digits',
      'std': [1.0, 0.5, 0.7],
    },
    {
      'label': 'ResNet-8',
      'residual': True,
      'depth': 8,
      'dataset': 'digits',
      'std': [0.4, 0.2, 0.3],
    },
  ]
  out = responses.plot_responses(results, str(tmp_path / 'r.png'))
  assert open(out, 'rb').read(4) == b'\x89PNG'


def test_preact_runs_are_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": {"preact": true, "name": "resnet110"}}')
  with pytest.raises(ValueError, match='pre-activation'):
    responses.layer_stds(str(tmp_path))


def test_response_layers_of_scanned_params_are_named_as_unrolled():
  """A scanned run's params (stacked layer{s}_scan) give one entry per layer, named as today."""
  assert responses.response_layers(
    _param_shapes('resnet20', 32, scan=True)
  ) == responses.response_layers(_param_shapes('resnet20', 32))


@pytest.mark.parametrize(
  'extra,needle',
  [
    (['--max-examples=-3'], 'expected an integer >= 0'),  # was a plot of 0 images, std nan, exit 0
    (['--batch-size=0'], 'expected a positive integer'),  # was the run's default, silently
    (['--batch-size=-2'], 'expected a positive integer'),  # was 'bad sharding: local_batch_size'
    (['--out={tmp}/afile/r.png'], 'is not an existing directory'),  # was a traceback at the end
    (['--out={tmp}/missing/r.png'], 'is not an existing directory'),
    (['--out={tmp}'], 'is a directory'),
    (['--out={tmp}/r.json'], 'not a plot format'),  # was a traceback after the forward passes
    (['--out={tmp}/r.txt'], 'not a plot format'),
  ],
)
def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys, extra, needle):
  (tmp_path / 'afile').write_text('')
  run = tmp_path / 'run'  # never read: the flags are refused first
  with pytest.raises(SystemExit) as e:
    responses.main([f'--workdir={run}', *(x.format(tmp=tmp_path) for x in extra)])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], err


def test_an_out_without_extension_is_written_where_the_message_says(tmp_path, monkeypatch, capsys):
  """--out=fig7 said 'wrote fig7' while matplotlib wrote fig7.png."""
  fake = {'label': 'ResNet-8', 'residual': True, 'depth': 8, 'dataset': 'digits', 'split': 'test'}
  fake.update(std=[0.4, 0.2], num_examples=10)
  monkeypatch.setattr(responses, 'layer_stds', lambda workdir, **kwargs: dict(fake))
  assert responses.main([f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "fig7"}']) == 0
  out = capsys.readouterr().out
  assert f'wrote {tmp_path / "fig7.png"} and {tmp_path / "fig7.json"}' in out, out
  assert (tmp_path / 'fig7.png').read_bytes()[:4] == b'\x89PNG' and not (tmp_path / 'fig7').exists()
