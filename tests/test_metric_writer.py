"""metrics.jsonl and TensorBoard events: readable back, locally and on object stores (issue 17).

GCS objects cannot be appended to: gcsfs (etils.epath's backend without TensorFlow) silently
opens mode 'a' as 'w'. A fake gs:// backend that behaves the same way, over a local directory,
checks the writer offline.
"""

import json
import os
import subprocess
import sys

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from resnet_jax.metric_writer import MetricWriter, is_remote


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://bucket/... maps to tmp_path/bucket/...; opening with 'a' overwrites, as gcsfs does.

  TensorBoard's gs:// writer needs credentials: it is replaced by a recorder here (the event
  files themselves are checked locally below).
  """
  root = tmp_path / 'gcs'

  def local(path):
    text = os.fspath(path)
    return str(root / text[len('gs://') :]) if text.startswith('gs://') else text

  def open_(original, path, mode):
    if not os.fspath(path).startswith('gs://'):
      return original(path, mode)
    target = local(path)
    if 'w' in mode or 'a' in mode:
      os.makedirs(os.path.dirname(target), exist_ok=True)
    return original(target, mode.replace('a', 'w'))

  def one(original, path, *a, **k):
    return original(local(path), *a, **k)

  def two(original, path, dst, *a, **k):
    return original(local(path), local(dst), *a, **k)

  scalars = []

  class RecordingWriter:
    def __init__(self, logdir):
      pass

    def add_scalar(self, tag, value, step):
      scalars.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      pass

  import tensorboardX

  monkeypatch.setattr(tensorboardX, 'SummaryWriter', RecordingWriter)
  # With TensorFlow installed epath would pick tf.io.gfile for gs://, which mock_epath leaves.
  monkeypatch.setattr(epath.gpath, '_is_tf_installed', lambda: False, raising=False)
  with epath_testing.mock_epath(
    open=open_,
    exists=one,
    isdir=one,
    makedirs=one,
    mkdir=one,
    remove=one,
    rename=two,
    replace=two,
  ):
    yield root, scalars


def _records(text):
  return [json.loads(l) for l in text.splitlines()]


def test_remote_metrics_keep_every_point(fake_gcs):
  root, scalars = fake_gcs
  writer = MetricWriter('gs://bucket/run', enabled=True)
  for step in (10, 20, 30):
    writer.write(step, 'train', {'loss': 1.0 / step})
  writer.close()
  text = (root / 'bucket' / 'run' / 'metrics.jsonl').read_text()
  assert [r['step'] for r in _records(text)] == [10, 20, 30]
  assert ('train/loss', 0.05, 20) in scalars


def test_remote_resume_truncates_then_appends_in_the_local_format(fake_gcs, tmp_path):
  root, _ = fake_gcs
  (tmp_path / 'local').mkdir()
  first = MetricWriter('gs://bucket/run', enabled=True)
  local = MetricWriter(str(tmp_path / 'local'), enabled=True)
  for w in (first, local):
    for step in (10, 20, 30):
      w.write(step, 'train', {'loss': float(step)})
    w.close()
  # A resume from step 20 in a new process: point 30 is dropped, then 30 and 40 are logged again.
  second = MetricWriter('gs://bucket/run', enabled=True)
  local = MetricWriter(str(tmp_path / 'local'), enabled=True)
  for w in (second, local):
    w.truncate_after(20)
    w.write(30, 'train', {'loss': 3.5})
    w.write(40, 'eval', {'loss': 4.0, 'top1_error': 0.5})
    w.close()
  remote_text = (root / 'bucket' / 'run' / 'metrics.jsonl').read_text()
  assert [(r['step'], r['split']) for r in _records(remote_text)] == [
    (10, 'train'),
    (20, 'train'),
    (30, 'train'),
    (40, 'eval'),
  ]
  assert remote_text == (tmp_path / 'local' / 'metrics.jsonl').read_text()


def test_is_remote():
  assert is_remote('gs://b/run') and is_remote(epath.Path('gs://b/run')) and is_remote('s3://b/r')
  assert not is_remote('/tmp/run') and not is_remote('runs/a') and not is_remote('file:///tmp/r')


def test_tensorboard_event_files_read_back(tmp_path):
  pytest.importorskip('tensorboard', reason='the reader: pip install -e ".[tensorboard]"')
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = MetricWriter(str(tmp_path), enabled=True)
  writer.write(5, 'train', {'loss': 2.5, 'top1_error': 0.75, 'note': 'text is not a scalar'})
  writer.write(10, 'train', {'loss': 1.5, 'top1_error': float('nan')})
  writer.write(10, 'eval', {'loss': 1.25, 'top5_error': 0.125})
  writer.write_text('config', 'model: resnet8')
  writer.close()
  events = EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'scalars': 0})
  events.Reload()
  scalars = events.Tags()['scalars']
  assert set(scalars) == {'train/loss', 'train/top1_error', 'eval/loss', 'eval/top5_error'}
  assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(5, 2.5), (10, 1.5)]
  assert [e.step for e in events.Scalars('train/top1_error')] == [5]  # NaN is not plotted
  assert [(e.step, e.value) for e in events.Scalars('eval/top5_error')] == [(10, 0.125)]
  assert 'config' in ''.join(events.Tags()['tensors'])


def test_resume_drops_torn_and_malformed_lines_and_keeps_the_rest(tmp_path):
  """A line torn by a crash was dropped, but one that parses to no record ('[1]', a hand-edited
  '"step": "4"') was a TypeError traceback at every resume."""
  good = [json.dumps({'step': s, 'split': 'train', 'loss': 1.0}) + '\n' for s in (10, 20, 30)]
  bad = ['[1]\n', '{"step": "4", "split": "train"}\n', '{"split": "eval"}\n', '\x00\x00\n']
  (tmp_path / 'metrics.jsonl').write_text(good[0] + ''.join(bad) + good[1] + good[2][:-9])
  w = MetricWriter(str(tmp_path), enabled=True)
  w.truncate_after(20)
  w.write(30, 'train', {'loss': 0.5})
  w.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [10, 20, 30]


def test_the_tensorboard_writer_does_not_import_pytorch(tmp_path):
  """tensorboardX imports torch when it is installed (GPU machines: 1.3 s and hundreds of MB on
  every start) only to accept torch tensors, which the writer never passes."""
  fake = tmp_path / 'site' / 'torch'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text('class Tensor:\n  pass\n')  # an installed torch, cheaply
  code = (
    'import sys\n'
    'from resnet_jax.metric_writer import MetricWriter\n'
    f'w = MetricWriter({str(tmp_path / "run")!r}, enabled=True)\n'
    "w.write(1, 'train', {'loss': 1.0})\n"
    "print('torch' in sys.modules)\n"
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / 'site'), os.getcwd()]))
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ['False']
  assert list((tmp_path / 'run' / 'tensorboard').iterdir())  # the events were written
