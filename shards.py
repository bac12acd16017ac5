"""Tar shards in webdataset's layout (DATA.TRAIN_SHARDS / DATA.VAL_SHARDS): local shards read
as a map-style dataset through a per-shard offset index, pipe:COMMAND shards streamed.

Layout: a shard is a plain (uncompressed) tar; members `<key>.<ext>` with ext one of jpg, jpeg,
png, webp (the image, its original bytes) and `<key>.cls` (the label as decimal text);
consecutive members with the same key make one sample, other members (.json, .txt, ...) are
ignored. timm's imagenet-1k-wds shards and tools/make_shards.py's output both fit. A sample id
is the sample's global position (shard order of the expanded pattern x member order), stable
across runs and the same for both readers: it seeds the sample's augmentation and its
pre-training mask.

Why two readers, and why not webdataset / wids
----------------------------------------------
The loaders of datasets.py guarantee: augmentation and masks seeded per sample; 1 and R
processes see the same global batches (one permutation per epoch from (SEED, epoch)); a run
resumed mid-epoch continues with exactly the batches it would have had; evaluation counts each
sample once for any number of processes; data errors raised in the main thread as one line.
webdataset's pipeline takes rank / worker from torch or from RANK / WORKER variables that
Paddle's launcher does not set; wids, its indexed reader, imports torch. The standard library's
tarfile, plus the braceexpand package for the patterns, is all either reader here needs.

- Local shards (ShardDataset): each member's data is a contiguous byte range of the file, so
  each shard gets an index -- `<shard>.index.json` beside it, written by tools/make_shards.py,
  or built once by scanning the tar headers (no image decoded) when missing or stale (the
  shard's size differs): key, image member, data offset, data size, label. ShardDataset is an
  ImageDataset whose image bytes come from one pread on a descriptor kept open: every sampler,
  seed and error path of datasets.py applies unchanged, with all the guarantees above.
- pipe:COMMAND shards (ShardStream; e.g. `pipe:curl -s https://host/train-{0000..1023}.tar`,
  or `pipe:cat` to stream local ones front to back): an iterable dataset. The epoch's shard
  order is drawn from (SEED, epoch); each process reads one contiguous range of that order,
  each loader worker one contiguous part of it, through a shuffle buffer
  (DATA.SHARD_SHUFFLE_BUFFER). The epoch length is known beforehand from the sample counts,
  counted once and kept in DATA_PATH/shard_counts.json (source_counts). Every sample is read
  once per epoch; only what the batch size forces (< processes x batch) is dropped; evaluation
  reads each sample once. Resuming mid-epoch replays each worker's stream up to where it was
  without decoding, so it is exact for the same number of processes and workers. What it
  gives up against the local reader: the global batches depend on the number of processes and
  workers, and the shuffle is shard order + buffer, not a full permutation.

Bad samples (a tar cut inside a member or a header, an undecodable image, a sample without
.cls when labels are needed, bad .cls text, a label >= MODEL.NUM_CLASSES, a failing command):
with DATA.ON_BAD_IMAGE 'error' one DataError line naming the shard and the member; with 'skip'
the sample keeps its id and is replaced by a readable one and counted, like an unreadable image
of a list file. A tar cut off inside a member or a header loses the samples after the cut; in
the index the cut counts as one bad sample. The index is trusted while the shard's size is
unchanged: a shard rewritten in place to the same size needs its index deleted.

Config values: DATA.TRAIN_SHARDS / VAL_SHARDS go through YAML (-opts too), so a pattern that
starts with '{' must be quoted twice (-opts DATA.TRAIN_SHARDS "'{a,b}-{0..9}.tar'"); several
patterns can be joined with '::'.
"""
import collections
import io
import json
import logging
import os
import math
import re
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import paddle
from braceexpand import UnbalancedBracesError
from braceexpand import braceexpand as _braceexpand

import datasets
import utils
from config import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
INDEX_SUFFIX = '.index.json'
INDEX_VERSION = 1


# ------------------------------------------------------------------------------ brace patterns

def braceexpand(pattern):
    """Shell-style brace expansion by the braceexpand package (webdataset's too):
    `a-{0000..0003}.tar`, `{train,val}-{0..1}.tar`, nested braces; `{x}` stays as it is.
    Backslashes are kept (escape=False): they belong to pipe: commands, not to the pattern."""
    try:
        return list(_braceexpand(pattern, escape=False))
    except UnbalancedBracesError:
        raise ConfigError(f'unbalanced braces in the shard pattern {pattern!r}') from None


def expand(pattern, root=''):
    """The shard sources of a DATA.*_SHARDS value, in order: local paths (a relative pattern is
    taken relative to root, DATA.DATA_PATH) or `pipe:COMMAND` strings (braces in the command
    expanded too). Several patterns may be separated by '::'."""
    pattern = pattern.strip()
    if not pattern:
        raise ConfigError('empty shard pattern')
    sources = []
    for part in pattern.split('::'):
        part = part.strip()
        for s in braceexpand(part):
            if s.startswith('pipe:'):
                sources.append(s)
            elif os.path.isabs(os.path.expanduser(s)):
                sources.append(os.path.expanduser(s))
            else:
                if not root:
                    raise datasets.DataError(f'the shard pattern {part!r} is relative but DATA.DATA_PATH'
                                      f' is not set (-data_path DIR), or give an absolute path')
                sources.append(os.path.join(root, s))
    return sources


# ---------------------------------------------------------------------------------- the index

def split_key(name):
    """Member name -> (key, extension): webdataset's rule, the basename split at its first dot
    (the directory stays in the key)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition('.')
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def index_path(shard):
    return shard + INDEX_SUFFIX


def sample_of(key, exts, cls_bytes):
    """The one rule (index and stream) from a key's members to a sample: exts, the extensions
    present; cls_bytes, the .cls member's content (None: none). -> None when the members make
    no sample (metadata only), else (image extension or None, label or None, problem or None).
    Of several image members the first of IMAGE_EXTS is the image."""
    ext = next((e for e in IMAGE_EXTS if e in exts), None)
    if ext is None and 'cls' not in exts:
        return None
    if ext is None:
        return None, None, f'sample {key} has {key}.cls but no image member ' \
                           f'(.{", .".join(IMAGE_EXTS)})'
    if cls_bytes is None:
        return ext, None, None
    text = cls_bytes.decode('utf-8', 'replace').strip()
    if re.fullmatch(r'\d+', text):
        return ext, int(text), None
    return ext, None, f'member {key}.cls: the label {text[:20]!r} is not an integer >= 0'


def label_problem(key, label, need_labels, num_classes):
    """What is wrong with a sample's label for the task (None: nothing)."""
    if label is None:
        return f'sample {key} has no {key}.cls member (the label)' if need_labels else None
    if num_classes is not None and label >= num_classes:
        return (f'{key}.cls: label {label} is outside 0..{num_classes - 1} '
                f'(MODEL.NUM_CLASSES {num_classes})')
    return None


def bad_sample_message(where, reason):
    return (f'bad sample in {where}: {reason}. Fix the shard, or set DATA.ON_BAD_IMAGE skip to '
            f'skip bad samples')


def scan(shard):
    """Index a local tar by reading its headers and .cls members (no image is decoded):
    {'version', 'shard_bytes', 'samples': [[key, image member or null, data offset, data size,
    label or null (no .cls), problem or null], ...]} in member order. A problem (tar truncated
    inside a member or a header, unreadable .cls, a .cls without an image) is a short text
    naming the member; the sample keeps its place, so sample ids do not move. Keys with neither
    an image nor a .cls are not samples."""
    size = os.path.getsize(shard)
    groups = []  # [key, {ext: (member name, data offset, data size)}], consecutive keys
    end = 0      # padded end of the last complete member
    truncated, tail_problem = None, None
    samples = []
    with open(shard, 'rb') as f:
        try:
            tar = tarfile.open(fileobj=f, mode='r:')
        except tarfile.TarError as e:
            raise datasets.DataError(f'{shard}: not a readable tar file ({e})') from None
        try:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if not groups or groups[-1][0] != key:
                    groups.append([key, {}])
                if m.offset_data + m.size > size:  # tarfile does not notice
                    truncated = len(groups) - 1
                    groups[-1][1]['_cut'] = (m.name, m.offset_data, m.size)
                    break
                groups[-1][1].setdefault(ext, (m.name, m.offset_data, m.size))
                end = m.offset_data + (m.size + 511) // 512 * 512
        except tarfile.TarError as e:
            tail_problem = f'tar header unreadable after byte {end} ({e})'
        if truncated is None and tail_problem is None:
            # tarfile stops silently at a cut-off header or at the end of the file: after the
            # last member there must be the end-of-archive zero blocks and nothing else
            f.seek(end)
            if not _all_zero(f):
                tail_problem = f'tar truncated or corrupt after byte {end} (a partial header)'
            elif end + 1024 > size and groups:
                tail_problem = f'tar truncated after byte {end} (no end-of-archive blocks)'
        for key, members in groups:
            if '_cut' in members:
                name, off, n = members['_cut']
                samples.append([key, None, 0, 0, None,
                                f'tar truncated inside member {name} ({n} bytes at byte {off}, '
                                f'the file has {size})'])
                continue
            cls_bytes = None
            if 'cls' in members:
                f.seek(members['cls'][1])
                cls_bytes = f.read(members['cls'][2])
            sample = sample_of(key, members, cls_bytes)
            if sample is None:
                continue  # members of no sample (metadata): ignored
            ext, label, problem = sample
            image = members[ext] if ext else (None, 0, 0)
            samples.append([key, *image, label, problem])
    if tail_problem:
        samples.append([f'<after byte {end}>', None, 0, 0, None, tail_problem])
    return {'version': INDEX_VERSION, 'shard_bytes': size, 'samples': samples}


def _all_zero(f, chunk=1 << 20):
    """Whether the rest of the open file holds only zero bytes (read in chunks)."""
    while True:
        block = f.read(chunk)
        if not block:
            return True
        if block.strip(b'\0'):
            return False


def write_json(path, obj):
    """Write obj as JSON to path under a temporary name, then rename (several processes may
    write the same file); False, and nothing left behind, when the folder is not writable."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(tmp, 'w') as f:
            json.dump(obj, f, separators=(',', ':'))
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def write_index(shard, index):
    """Write <shard>.index.json; False when the folder is not writable."""
    return write_json(index_path(shard), index)


def load_index(shard):
    """The index of a local shard: <shard>.index.json when it matches the shard's size, else a
    scan (written beside the shard when the folder allows)."""
    if not os.path.isfile(shard):
        raise datasets.DataError(f'shard not found: {shard}')
    path = index_path(shard)
    size = os.path.getsize(shard)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                index = json.load(f)
            if index.get('version') == INDEX_VERSION and index.get('shard_bytes') == size:
                return index
        except (OSError, ValueError):
            pass
    index = scan(shard)
    if not write_index(shard, index):
        logger.warning('cannot write %s: the shard will be scanned again next time', path)
    return index


# -------------------------------------------------------------------------------- the dataset

class OpenShards:
    """Read byte ranges of shards through file descriptors kept open (os.pread: no shared file
    position), at most `most` at a time, least recently used closed first. Descriptors belong
    to the process that opened them: a forked loader worker opens its own. Keeping them open
    is what makes a sample read cheaper than opening an image file."""

    def __init__(self, most=64):
        self.most, self._fds, self._pid = most, collections.OrderedDict(), None

    def read(self, shard, offset, size):
        if self._pid != os.getpid():  # (inherited descriptors are left to their owner)
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= self.most:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(shard, os.O_RDONLY)
        self._fds[shard] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f'read {len(data)} of {size} bytes: the shard changed since it was '
                          f'indexed')
        return data

    def __getstate__(self):  # (a spawned worker starts with none open)
        return {'most': self.most, '_fds': collections.OrderedDict(), '_pid': None}


def shard_sources(config, is_train):
    """-> (the expanded sources of DATA.TRAIN_SHARDS / VAL_SHARDS, the key) or (None, key)
    when the key is empty."""
    key = 'TRAIN_SHARDS' if is_train else 'VAL_SHARDS'
    pattern = config.DATA[key]
    return (expand(pattern, config.DATA.DATA_PATH) if pattern else None), f'DATA.{key}'


def shard_args(config, is_train, transform, need_labels, key_name):
    """The constructor arguments both shard sources take from the config."""
    return dict(transform=transform, need_labels=need_labels,
                num_classes=config.MODEL.NUM_CLASSES if need_labels else None,
                on_bad_image=config.DATA.ON_BAD_IMAGE, mark_skipped=not is_train,
                key_name=key_name)


class ShardDataset(datasets.ImageDataset):
    """Samples of local tar shards -> (float32 image, int64 label, int64 sample id = the
    sample's global position: shard order x member order).

    sources: expand()'s list; need_labels: a sample without .cls is a bad sample (else its
    label is IGNORE_LABEL); num_classes: labels must be below it; key_name: the config key, for
    messages. The other arguments are ImageDataset's.
    """

    def __init__(self, sources, transform=None, need_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, key_name='DATA.TRAIN_SHARDS'):
        piped = [s for s in sources if s.startswith('pipe:')]
        if piped:
            raise ConfigError(f'{key_name}: pipe: sources ({piped[0]!r}) cannot be seeked: '
                              f'ShardStream streams them (sources.build_dataset chooses)')
        self.shards = list(sources)
        shard_of, offsets, sizes, labels, names, problems = [], [], [], [], [], {}
        for s, shard in enumerate(self.shards):
            for key, member, off, n, label, problem in load_index(shard)['samples']:
                problem = problem or label_problem(key, label, need_labels, num_classes)
                if problem:
                    problems[len(offsets)] = problem
                shard_of.append(s)
                offsets.append(off)
                sizes.append(n)
                labels.append(datasets.IGNORE_LABEL if label is None or problem else label)
                names.append(member or key)
        if not offsets:
            raise datasets.DataError(f'{key_name}: the shards ({self.shards[0]} ...) hold no '
                                     f'samples')
        if problems and on_bad_image == 'error':
            i = min(problems)
            raise datasets.DataError(bad_sample_message(f'shard {self.shards[shard_of[i]]}',
                                                        problems[i]))
        self._shard_of = np.asarray(shard_of, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._names = np.array([x.encode('utf-8') for x in names], dtype=np.bytes_)
        self.problems = problems  # sample id -> what is wrong with it (few)
        self._open = OpenShards()
        super().__init__([], labels, transform, on_bad_image, mark_skipped)

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        """Local shards (no pipe: source): read by seeking."""
        sources, key = shard_sources(config, is_train)
        if not sources or any(s.startswith('pipe:') for s in sources):
            return None
        return cls(sources, **shard_args(config, is_train, transform, need_labels, key))

    def __len__(self):
        return len(self._offsets)

    def member(self, index):
        return self._names[index].decode('utf-8')

    def path(self, index):
        return f'{self.shards[self._shard_of[index]]}:{self.member(index)}'

    def describe(self, index):
        return f'shard {self.shards[self._shard_of[index]]} member {self.member(index)}'

    def read_bytes(self, index):
        """Sample `index`'s image member, as stored."""
        return self._open.read(self.shards[self._shard_of[index]], int(self._offsets[index]),
                               int(self._sizes[index]))

    def read_image(self, index):
        problem = self.problems.get(int(index))
        if problem:
            raise OSError(problem)
        return datasets.decode_image(io.BytesIO(self.read_bytes(index)))


# ------------------------------------------------------------------------------ streamed shards

COUNTS_FILE = 'shard_counts.json'


def counts_path(root):
    """Where the sample counts of pipe: sources are kept: DATA_PATH/shard_counts.json, or the
    user's cache folder when no DATA_PATH is set."""
    if root:
        return os.path.join(root, COUNTS_FILE)
    return os.path.join(os.path.expanduser('~'), '.cache', 'mae_paddle', COUNTS_FILE)


def open_source(source):
    """-> (binary stream, subprocess or None): a local file, or the stdout of a pipe: command
    (run by the shell, stderr kept in a temporary file for the message if it fails)."""
    if not source.startswith('pipe:'):
        return open(source, 'rb'), None
    err = tempfile.TemporaryFile()
    # its own session: a Ctrl-C at the terminal stops the training process (which saves), not
    # the command under a loader worker; and it dies with the process reading it (kill -9)
    proc = subprocess.Popen(source[len('pipe:'):], shell=True, stdout=subprocess.PIPE,
                            stderr=err, bufsize=1 << 20, start_new_session=True,
                            preexec_fn=utils.die_with_parent)
    proc.err = err
    return proc.stdout, proc


def _close_source(f, proc, finished):
    """Close the stream; a command that failed (after the stream ended) -> its problem text."""
    f.close()
    if proc is None:
        return None
    if not finished:
        proc.kill()
    code = proc.wait()
    proc.err.seek(0)
    tail = proc.err.read()[-300:].decode('utf-8', 'replace').strip().replace('\n', ' ')
    proc.err.close()
    if finished and code != 0:
        return f'the command exited with code {code}' + (f': {tail}' if tail else '')
    return None


def stream_samples(source, read_images=True):
    """The samples of one shard read front to back (tarfile's streaming mode: no seek, so a
    pipe works): yields (key, image member or None, image bytes or None, label or None,
    problem or None) in member order, grouped as scan() groups them. A tar that cannot be read
    on ends the stream with one more item whose problem says where; a failed pipe: command
    too."""
    f, proc = open_source(source)
    finished = False
    group = None  # [key, {ext: (member name, bytes or None)}], the current key's members

    def emit(g):
        key, members = g
        sample = sample_of(key, members, members.get('cls', (None, None))[1])
        if sample is None:
            return None
        ext, label, problem = sample
        name, data = members[ext] if ext else (None, None)
        return key, name, data, label, problem

    try:
        try:
            with tarfile.open(fileobj=f, mode='r|') as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = split_key(m.name)
                    if group is None or group[0] != key:
                        if group is not None:
                            item = emit(group)
                            if item:
                                yield item
                        group = [key, {}]
                    if ext not in group[1] and (ext in IMAGE_EXTS or ext == 'cls'):
                        group[1][ext] = (m.name, None)  # (named first: a cut names it)
                        if ext == 'cls' or read_images:
                            group[1][ext] = (m.name, tar.extractfile(m).read())
            if group is not None:
                item = emit(group)
                if item:
                    yield item
        except (tarfile.TarError, OSError, EOFError) as e:
            where = '<start>' if group is None else \
                list(group[1].values())[-1][0] if group[1] else group[0]
            cut = (where, None, None, None, f'the tar is cut or unreadable here ({e})')
            while proc is not None and f.read(1 << 20):  # to the end: the command's exit code
                pass
        else:
            cut = None
        finished = True
    finally:
        failed = _close_source(f, proc, finished)
    if failed:  # the command's failure explains a cut
        yield '<command>', None, None, None, failed
    elif cut:
        yield cut


def count_samples(source):
    """Samples of a shard, counted by reading it once (images are not kept); a cut tar's cut
    counts as one sample, as in scan(). A source that is no tar at all, or whose command
    fails, raises DataError."""
    n = 0
    for key, _, _, _, problem in stream_samples(source, read_images=False):
        if key == '<command>' or (key == '<start>' and problem):
            raise datasets.DataError(f'cannot count the samples of {source}: {problem}')
        n += 1
    return n


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def source_counts(sources, root, log=None):
    """Sample count of each source, known before any epoch: a local shard's from its index
    (load_index); a pipe: source's from counts_path(root), where sources not yet listed are
    counted once by streaming them and added (written atomically)."""
    path = counts_path(root)
    known = {}
    if any(s.startswith('pipe:') for s in sources) and os.path.isfile(path):
        try:
            with open(path) as f:
                known = json.load(f)
        except (OSError, ValueError) as e:
            raise datasets.DataError(f'{path}: unreadable sample counts ({e}); delete it to count '
                              f'again') from None
    missing = [s for s in sources if s.startswith('pipe:') and s not in known]
    if missing:
        (log or _stderr)(f'counting the samples of {len(missing)} streamed shard(s) once (kept in {path})')
        for s in missing:
            known[s] = count_samples(s)
        if not write_json(path, known):
            (log or _stderr)(f'cannot write {path}: the shards will be counted again next time')
    return [known[s] if s.startswith('pipe:') else len(load_index(s)['samples'])
            for s in sources]


class _Bad(Exception):
    """A problem found while reading a streamed shard (its text is the message)."""


class ShardStream(datasets.DataSource, paddle.io.IterableDataset):
    """Shards read front to back, for sources that cannot be seeked (pipe:COMMAND; see the
    module's docstring): yields (float32 image, int64 label, int64 sample id = global position,
    as ShardDataset's).

    An epoch's plan, fixed before the epoch from the sample counts (source_counts):
    - training: the shards in an order drawn from (seed, epoch), their samples laid end to
      end; S = T // (R * B) batches per process (T samples, R processes, batch B; only the
      last T - S*R*B < R*B samples of the order are dropped, as the batch size forces); process
      r reads the contiguous range [r*S*B, (r+1)*S*B);
    - evaluation: the shards in pattern order; process r reads [r*T//R, (r+1)*T//R), its
      last batch short.
    A process's batches j = 0, 1, ... are dealt to its W loader workers round robin (j % W),
    the order in which Paddle's loader collects them; worker w reads the contiguous part of the
    process's range that holds its batches (so every sample is read by one worker only, at
    most one partial shard more per worker) and, in training, shuffles it through a buffer of
    `shuffle_buffer` samples (RNG from (seed, epoch, rank, w)). Resuming at batch k rotates the
    roles (loader worker p plays w = (p + k) % W) and each worker replays its stream up to its
    first batch after k without decoding: the batches after k are those an uninterrupted run
    gets, for the same R and W.
    Bad samples: with on_bad_image 'error' a DataError naming the shard and the member; with
    'skip' a bad sample (undecodable image, no .cls, a sample lost to a cut tar) is replaced by
    the next readable one, keeps its id and is counted in num_skipped.
    """

    streamed = True

    def __init__(self, sources, counts, transform=None, need_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, train=False, seed=0,
                 shuffle_buffer=0, key_name='DATA.TRAIN_SHARDS'):
        datasets.DataSource.__init__(self, transform, on_bad_image, mark_skipped)
        self.sources = list(sources)
        self.counts = np.asarray(counts, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        if not self.starts[-1]:
            raise datasets.DataError(f'{key_name}: the shards ({self.sources[0]} ...) hold no '
                                     f'samples')
        self.need_labels, self.num_classes = need_labels, num_classes
        self.train, self.seed, self.shuffle_buffer = train, seed, shuffle_buffer
        self.key_name = key_name
        self.batch_size, self.rank, self.nranks, self.num_workers = 1, 0, 1, 0
        self.epoch, self.start_batch = 0, 0

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        """Shards with a pipe: source: streamed front to back."""
        sources, key = shard_sources(config, is_train)
        if not sources or not any(s.startswith('pipe:') for s in sources):
            return None
        if is_train and config.TRAIN.ITERS_PER_EPOCH:
            raise ConfigError('TRAIN.ITERS_PER_EPOCH is not supported with streamed (pipe:) '
                              'shards: an epoch is one pass over them')
        return cls(sources, source_counts(sources, config.DATA.DATA_PATH), train=is_train,
                   seed=config.SEED, shuffle_buffer=config.DATA.SHARD_SHUFFLE_BUFFER,
                   **shard_args(config, is_train, transform, need_labels, key))

    def __len__(self):
        return int(self.starts[-1])

    def configure(self, batch_size, rank, nranks, num_workers):
        self.batch_size, self.rank, self.nranks = batch_size, rank, nranks
        self.num_workers = num_workers

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self):
        """What an epoch's plan depends on besides (seed, epoch): (processes, loader workers,
        batch); saved with checkpoints, compared on resume (engine.fit)."""
        return self.nranks, self.num_workers, self.batch_size

    # ------------------------------------------------------------------------------ the plan

    def _rank_range(self):
        """[first, last) positions of this process in the epoch's order."""
        total, r, n = len(self), self.rank, self.nranks
        if self.train:
            per = total // (n * self.batch_size) * self.batch_size
            return r * per, (r + 1) * per
        return r * total // n, (r + 1) * total // n

    def num_batches(self):
        """Batches of this process per epoch (the loader's len)."""
        lo, hi = self._rank_range()
        return math.ceil((hi - lo) / self.batch_size)

    def order(self):
        """The epoch's shard order (training: drawn from (seed, epoch))."""
        if self.train:
            return utils.rng(self.seed, self.epoch, 'shards').permutation(len(self.sources))
        return np.arange(len(self.sources))

    def worker_plan(self, w, workers):
        """(first, last) positions of worker role w of `workers`, and how many of its samples
        are already consumed when the epoch starts at self.start_batch."""
        lo, hi = self._rank_range()
        nb, b = self.num_batches(), self.batch_size
        counts = [len(range(v, nb, workers)) for v in range(workers)]
        first = lo + sum(counts[:w]) * b
        last = min(first + counts[w] * b, hi)
        done = len(range(w, min(self.start_batch, nb), workers)) * b
        return first, last, min(done, last - first)

    # --------------------------------------------------------------------------- iteration

    def _records(self, first, last):
        """(sample id, shard, image member, bytes, label, problem) of positions [first, last)
        of the epoch's order, in that order."""
        pos = 0
        for s in self.order():
            n = int(self.counts[s])
            if pos + n <= first:
                pos += n
                continue
            if pos >= last:
                break
            skip, take = max(first - pos, 0), min(last, pos + n) - max(first, pos)
            seen, failed = 0, None
            for i, (key, member, data, label, problem) in enumerate(
                    stream_samples(self.sources[s], read_images=True)):
                if key == '<command>':
                    failed = problem
                    break
                if i >= n:  # the plan of the epoch is wrong: no skipping this
                    raise datasets.DataError(
                        f'shard {self.sources[s]} holds more samples than counted ({n}): '
                        f'delete its entry in {COUNTS_FILE} to count it again')
                if i < skip or seen == take:
                    continue
                problem = problem or label_problem(key, label, self.need_labels,
                                                   self.num_classes)
                yield int(self.starts[s]) + i, s, member or key, data, label, problem
                seen += 1
                if seen == take and skip + take < n:  # (to a shard's end: read on, to check)
                    break
            for i in range(skip + seen, skip + take):  # the stream ended early: a cut tar
                yield (int(self.starts[s]) + i, s, f'sample {i + 1} of {n}', None, None,
                       failed or f'the stream ended after {skip + seen} of {n} samples (a cut '
                                 f'tar?)')
            pos += n

    def _shuffled(self, records, rng):
        """Buffer shuffle (webdataset's): keep `shuffle_buffer` records, emit a random one as
        each new one arrives."""
        if not self.train or self.shuffle_buffer <= 1:
            yield from records
            return
        buf = []
        for rec in records:
            if len(buf) < self.shuffle_buffer:
                buf.append(rec)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], rec = rec, buf[i]
            yield rec
        rng.shuffle(buf)
        yield from buf

    def _decode(self, rec):
        """-> (image, label); raises _Bad with the problem found while reading, or what
        decoding raises."""
        sid, s, member, data, label, problem = rec
        if problem:
            raise _Bad(problem)
        return (datasets.decode_image(io.BytesIO(data)),
                datasets.IGNORE_LABEL if label is None else label)

    def _where(self, rec):
        return f'shard {self.sources[rec[1]]} member {rec[2]}'

    def _samples(self, records):
        """Decoded, transformed samples; bad ones raised (error) or replaced by the next
        readable one (skip), keeping their ids."""
        pending, last = [], None
        for rec in records:
            try:
                img, label = self._decode(rec)
            except Exception as e:
                if self.on_bad_image == 'error':
                    reason = str(e) if isinstance(e, _Bad) else datasets.explain(e)
                    raise datasets.BadImageError(bad_sample_message(self._where(rec),
                                                                    reason)) from None
                self.count_skipped(self._where(rec), e)
                pending.append(rec[0])
                if len(pending) >= datasets.MAX_BAD_IN_A_ROW:
                    raise datasets.DataError(f'{len(pending)} bad samples in a row, up to '
                                             f'{self._where(rec)}') from None
                continue
            for sid in pending:  # replaced by this one
                yield self._sample(img, datasets.IGNORE_LABEL if self.mark_skipped else label,
                                   sid)
            pending = []
            last = (img, label)
            yield self._sample(img, label, rec[0])
        if pending:
            if last is None:
                raise datasets.DataError(f'no readable sample in {self.key_name} for this '
                                         f'loader worker')
            for sid in pending:
                yield self._sample(last[0], datasets.IGNORE_LABEL if self.mark_skipped
                                   else last[1], sid)

    def _sample(self, img, label, sid):
        return self.transformed(img, sid), np.int64(label), np.int64(sid)

    def __iter__(self):
        info = paddle.io.get_worker_info()
        workers, p = (info.num_workers, info.id) if info is not None else (1, 0)
        w = (p + self.start_batch) % workers
        first, last, done = self.worker_plan(w, workers)
        rng = utils.rng(self.seed, self.epoch, 'buffer', self.rank, w)
        records = self._shuffled(self._records(first, last), rng)
        try:
            for _ in range(done):  # resumed mid-epoch: replay without decoding
                next(records)
            yield from self._samples(records)
        except Exception as e:
            self.record_error(e)  # (deferred: the loader raises it; this worker stops)
