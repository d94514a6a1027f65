"""The command line's one results file: a TSV with a header line and one row per input, keyed by its
first field (the input's index). A run writes its rows as they are done to a part file per torchrun
rank (each row flushed at once, so a killed run keeps them); rank 0 merges the part files into the
TSV, one row per index in index order, atomically. An interrupted run resumes from the complete rows of
the TSV and of every part file (a row cut short by a kill, and anything after it, is dropped), after
checking that the settings stored beside the TSV are those of the run that continues it. A --force run
writes aside (:meth:`ResultsFile.aside`, OUT.new and its part and settings files) and replaces the old
result only when it has finished (:meth:`ResultsFile.replace`); a run that fails before any row is done
leaves no files (:meth:`ResultsFile.discard_empty`)."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .common import CLIError, write_summary

__all__ = ["ResultsFile", "RowWriter"]


class ResultsFile:
    """The TSV at path with the given header line (columns joined by tabs). fields: how each field
    after the index of a complete row parses (a callable that raises ValueError on a bad field); a
    row of another width is not complete. Its settings and summary live in a JSON file beside it
    (:attr:`settings_path`)."""

    def __init__(self, path: str, header: str, fields: Sequence[Callable[[str], object]] = ()):
        self.path, self.header, self.fields = path, header, tuple(fields)

    @property
    def settings_path(self) -> str:
        return self.path + ".json"

    def parse_row(self, line: str) -> Optional[int]:
        """The idx of line if it is a complete row of this file, else None."""
        f = line.split("\t")
        if len(f) != len(self.fields) + 1:
            return None
        try:
            for parse, field in zip(self.fields, f[1:]):
                parse(field)
            return int(f[0])
        except ValueError:
            return None

    def read(self, path: Optional[str] = None) -> Tuple[Dict[int, str], int]:
        """The complete rows of the file at path (None: this TSV) as {idx: line}, the first of each idx,
        and the length in bytes of the valid prefix (header and complete rows; 0 when even the header
        is incomplete). A row cut short by a kill, and anything after it, is not valid."""
        path = self.path if path is None else path
        if not os.path.exists(path):
            return {}, 0
        with open(path, "rb") as fh:
            data = fh.read()
        head = (self.header + "\n").encode()
        if not data.startswith(head):
            if head.startswith(data):
                return {}, 0  # killed while writing the header
            raise ValueError(f"{path!r} exists but is not a robustops TSV of this kind (its first line is not "
                             f"{self.header!r}); remove it or choose another -o")
        rows: Dict[int, str] = {}
        valid = len(head)
        for raw in data[len(head):].split(b"\n")[:-1]:  # the last piece has no newline: empty or a partial row
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                break
            idx = self.parse_row(line)
            if idx is None:
                break
            rows.setdefault(idx, line)
            valid += len(raw) + 1
        return rows, valid

    def part_path(self, rank: int) -> str:
        """The part file of a torchrun rank."""
        return f"{self.path}.rank{rank}.part"

    def part_files(self) -> List[str]:
        """The part files there are now (from a run with any number of processes), sorted."""
        return sorted(glob.glob(glob.escape(self.path) + ".rank*.part"))

    def done(self) -> set:
        """The indices with a complete row in the TSV or in any part file."""
        done: set = set()
        for p in [self.path] + self.part_files():
            done.update(self.read(p)[0])
        return done

    def open_part(self, rank: int):
        """The rank's part file opened for appending rows (line buffered): what is there is kept up to
        its last complete row, a new one starts with the header. Returns the file handle."""
        path = self.part_path(rank)
        valid = self.read(path)[1]
        if valid:
            with open(path, "r+b") as fh:
                fh.truncate(valid)
            return open(path, "a", buffering=1)
        fh = open(path, "w", buffering=1)
        fh.write(self.header + "\n")
        fh.flush()
        return fh

    def write(self, lines: Iterable[str]) -> None:
        """The header and lines as the TSV, atomically (through a temporary file beside it)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(self.header + "\n")
            for line in lines:
                fh.write(line + "\n")
        os.replace(tmp, self.path)

    def merge(self) -> List[str]:
        """Rows of the TSV and of every part file, one per idx, sorted by idx, written atomically to the
        TSV; the part files are removed. Returns the rows."""
        rows = self.read()[0]
        parts = self.part_files()
        for p in parts:
            for idx, line in self.read(p)[0].items():
                rows.setdefault(idx, line)
        lines = [rows[i] for i in sorted(rows)]
        self.write(lines)
        for p in parts:
            os.remove(p)
        return lines

    def aside(self) -> "ResultsFile":
        """The results file a --force run writes (OUT.new, its part files and settings beside it): it
        replaces this one only when complete (:meth:`replace`), so a failed or killed --force run leaves
        the previous result as it was."""
        return ResultsFile(self.path + ".new", self.header, self.fields)

    def files(self) -> List[str]:
        """The files of this result there are now: TSV, settings, part files."""
        return [p for p in [self.path, self.settings_path] + self.part_files() if os.path.exists(p)]

    def replace(self, old: "ResultsFile") -> None:
        """This finished result (its part files merged) moved over old's: old's part files removed, then
        its settings and its TSV replaced (each atomically)."""
        for p in old.part_files():
            os.remove(p)
        os.replace(self.settings_path, old.settings_path)
        os.replace(self.path, old.path)

    def discard_empty(self, rank: int) -> None:
        """After a failed run: the rank's part file removed if it holds no row, and on rank 0 the settings
        file too when no TSV or part file holds a row (nothing to resume)."""
        part = self.part_path(rank)
        if os.path.exists(part) and not self.read(part)[0]:
            os.remove(part)
        if rank == 0 and not os.path.exists(self.path) and not self.done() and os.path.exists(self.settings_path):
            os.remove(self.settings_path)

    def prepare(self, settings: dict, *, resume: bool, force: bool, command: str,
                other_kind: Callable[[dict, dict], Optional[str]]) -> None:
        """Before a run, holding the output's lock: a fresh run refuses an existing result unless force
        (then the run writes :meth:`aside`, cleared of what a failed --force run left there, and this
        result stays until the new one has finished); a resumed run must have the settings of the one it
        continues (other_kind(old, new): how the stored run differs in kind, or None; then every setting
        is compared) and readable rows. Writes the settings file (format robustops.COMMAND/1) of the
        file the run writes."""
        outfile, target = self.path, self.aside() if force else self
        existing = self.files() + self.aside().files()
        if resume:
            if os.path.exists(self.settings_path):
                self._check_settings(settings, command, other_kind)
            elif self.files():
                print(f"robustops {command}: warning: {outfile} has no settings file ({self.settings_path}); "
                      f"resuming without checking that the settings match", file=sys.stderr)
            for p in [outfile] + self.part_files():
                try:
                    self.read(p)
                except ValueError as e:
                    raise CLIError(str(e)) from None
        elif existing and not force:
            names = ", ".join(os.path.basename(p) for p in existing)
            raise CLIError(f"-o {outfile} already holds a result ({names}); --resume continues it, --force "
                           f"replaces it")
        elif force:
            for p in target.files():
                os.remove(p)
        spath = target.settings_path
        os.makedirs(os.path.dirname(os.path.abspath(spath)), exist_ok=True)
        tmp = f"{spath}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"format": f"robustops.{command}/1", "settings": settings}, fh, indent=1)
        os.replace(tmp, spath)

    def _check_settings(self, settings: dict, command: str, other_kind) -> None:
        with open(self.settings_path) as fh:
            try:
                old = json.load(fh).get("settings", {})
            except ValueError:
                raise CLIError(f"--resume: {self.settings_path} is not a robustops {command} settings file") \
                    from None
        kind = other_kind(old, settings)
        if kind:
            raise CLIError(f"--resume: {self.path} was made {kind}, or another -o")
        diff = [f"--{k.replace('_', '-')} {old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise CLIError(f"--resume: {self.path} was made with other settings: {', '.join(diff)}; "
                           f"use the same settings, or another -o")

    def add_summary(self, summary: dict) -> str:
        """The run's summary added to its settings file (rewritten atomically). Returns that file's path."""
        with open(self.settings_path) as fh:
            record = json.load(fh)
        record["summary"] = summary
        return write_summary(self.settings_path, record)


class RowWriter:
    """Rows appended to an open file (None: no file) as inputs are done, each flushed at once (a killed
    run keeps every row it finished), with a progress bar over total inputs; without the bar (stderr not
    a terminal, or --no-progress) and with lines (the command's name), plain progress lines on stdout:
    one per tenth of the inputs, and one at least every minute. unit: what is counted ("input", or
    "row" where a row is not one input)."""

    def __init__(self, fh, total: int, desc: str, show: bool, lines: Optional[str] = None, unit: str = "input"):
        import time

        from tqdm.auto import tqdm

        self.fh, self.total, self.done, self.unit = fh, total, 0, unit
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)
        self.lines = None if show else lines
        self.t0 = self.last = time.perf_counter()
        self.next = 1

    def write(self, line: str) -> None:
        try:
            self.fh.write(line + "\n")
            self.fh.flush()
        except OSError as e:  # a full disk: name the file (the rows written before are complete and kept)
            raise OSError(e.errno, e.strerror, getattr(self.fh, "name", None)) from e

    def tick(self, n: int, **postfix) -> None:
        """n more inputs done; postfix: what the bar (or the progress line) shows beside its count."""
        import time

        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(**postfix)
        self.done += n
        now = time.perf_counter()
        if self.lines and self.total and (self.done * 10 >= self.next * self.total or now - self.last >= 60):
            self.next = self.done * 10 // self.total + 1
            self.last = now
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            print(f"robustops {self.lines}: {self.done}/{self.total} {self.unit}s ({100 * self.done // self.total}%)"
                  f"{extra}, {now - self.t0:.1f}s", flush=True)

    def close(self) -> None:
        """Closes the bar (the file is its opener's)."""
        self.bar.close()
