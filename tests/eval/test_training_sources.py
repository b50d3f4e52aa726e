"""The readers of training-only text (GCIDE, Debian package descriptions, man-page NAME lines) on
small files written here, and on the installed packages where present."""

import gzip
import os

import pytest

from megatron_gem.eval import training_sources as ts
from megatron_gem.eval.corpora import CorpusMissing

# ---- Debian control files ----

STATUS = """Package: foo
Status: install ok installed
Source: foo-src (1.2-3)
Description: a tool that frobs widgets
 Foo frobs widgets quickly.
 It is fast.
 .
 Features:
  * one
  * two

Package: bar
Version: 1
Description: bar synopsis only

Package: nodesc
Version: 2

Package: foo
Description: the second stanza of a name is not read
"""


def test_debian_packages_from_a_control_file(tmp_path):
    status = tmp_path / "status"
    status.write_text(STATUS)
    assert ts.debian_packages([str(status)]) == [
        ts.DebianPackage("foo", "foo-src", "a tool that frobs widgets", ("Foo frobs widgets quickly. It is fast.", "Features: * one * two")),
        ts.DebianPackage("bar", "bar", "bar synopsis only", ()),
    ]
    assert ts.source_packages(str(status)) == {"foo": "foo-src", "bar": "bar", "nodesc": "nodesc"}
    with pytest.raises(CorpusMissing, match="dpkg"):
        ts.debian_packages([str(tmp_path / "none")])


# ---- man pages ----

PAGES = {
    "man1/foo.1.gz": '.TH FOO 1\n.\\" a comment\n.SH NAME\n\\fBfoo\\fR, bar \\- frob the \\(lqwidgets\\(rq\n.SH SYNOPSIS\n.B foo\n',
    "man7/redirect.7.gz": ".so man1/foo.1\n",
    "man8/ssh.8": ".Dd May 1\n.Sh NAME\n.Nm ssh\n.Nd OpenSSH remote login client\n.Sh SYNOPSIS\n",
    "man5/rst.5.gz": ".TH RST 5\n.SH NAME\nrst \\- a page rst2man wrote\n.\n.de1 INDENT\n\\\\$1 \\\\n[an-margin]\n..\n.SH SYNOPSIS\n",
    "man1/gcloud_x.1.gz": '.TH "GCLOUD" 1\n.SH "NAME"\n.HP\ngcloud x \\- manage x things\n\n\n\n.SH "SYNOPSIS"\n',
    "man3/none.3.gz": ".TH NONE 3\n.SH DESCRIPTION\nno NAME section\n",
    "man1/orphan.1.gz": ".SH NAME\norphan \\- owned by no package\n",
}


def _write_man_tree(tmp_path):
    root, info = tmp_path / "man", tmp_path / "info"
    info.mkdir()
    for rel, text in PAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    os.symlink(root / "man1/foo.1.gz", root / "man1/bar.1.gz")  # the same page under a second name
    owned = [rel for rel in PAGES if rel != "man1/orphan.1.gz" and rel != "man8/ssh.8"]
    (info / "pkg-a.list").write_text("".join(f"{root / rel}\n" for rel in owned) + f"{root / 'man1/bar.1.gz'}\n")
    (info / "openssh-client:amd64.list").write_text(f"{root}\n{root / 'man8/ssh.8'}\n")
    return str(root), str(info)


def test_man_page_name_lines(tmp_path):
    root, info = _write_man_tree(tmp_path)
    pages = ts.man_page_names(root, info)
    assert [(os.path.relpath(p.path, root), p.package, p.text) for p in pages] == [
        ("man1/bar.1.gz", "pkg-a", 'foo, bar - frob the "widgets"'),  # read once, under its first name
        ("man1/gcloud_x.1.gz", "pkg-a", "gcloud x - manage x things"),
        ("man5/rst.5.gz", "pkg-a", "rst - a page rst2man wrote"),
        ("man8/ssh.8", "openssh-client", "ssh - OpenSSH remote login client"),
    ]
    assert ts.dpkg_owners([os.path.join(root, "man1/orphan.1.gz")], info) == {os.path.join(root, "man1/orphan.1.gz"): None}
    assert ts.packages_under(root, info) == {"pkg-a", "openssh-client"}
    with pytest.raises(CorpusMissing, match="manpages"):
        ts.man_page_names(str(tmp_path / "empty"), info)


# ---- GCIDE ----

ENTRIES = [
    (
        ["Accrue", "Accrued"],  # two headwords, one entry: read once
        'Accrue \\Ac*crue"\\ ([a^]k*kr[udd]"), v. i. [imp. & p. p.\n'
        "   {Accrued}; p. pr. & vb. n. {Accruing}.] [See {Accrue}, n.]\n"
        "   1. To increase; to augment.\n"
        "      [1913 Webster]\n\n"
        "            And though power failed, her courage did accrue.\n"
        "                                                  --Spenser.\n"
        "      [1913 Webster]\n\n"
        '   2. (Law) To come to by way of increase; as, "Interest\n'
        '      accrues to principal." --Abbott.\n'
        "      [1913 Webster]\n",
    ),
    (["accretionary"], "accretionary \\accretionary\\ adj.\n   Marked or produced by accretion.\n   [WordNet 1.5]\n"),
    (
        ["Cafe"],
        "Cafe \\Caf['e]\\, n.\n"
        "   A coffee house; a caf['e] where [ae]sthetes meet. [Obs.] -- {Caf\"e*ist}, n.\n"
        "   [1913 Webster]\n\n"
        "   Syn: Coffeehouse; restaurant.\n"
        "        [1913 Webster]\n\n"
        "   A tail with no source line.\n",
    ),
]


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        n, r = divmod(n, 64)
        digits = alphabet[r] + digits
        if n == 0:
            return digits


def test_gcide_entries_from_a_dictd_database(tmp_path):
    header = "00-database-short\n   The Collaborative International Dictionary of English\n\n"
    data, index = header.encode(), [f"00-database-short\t{_b64(0)}\t{_b64(len(header))}\n"]
    for words, text in ENTRIES:
        start = len(data)
        data += text.encode() + b"\n"
        index += [f"{w}\t{_b64(start)}\t{_b64(len(text.encode()))}\n" for w in words]
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "gcide.index").write_text("".join(index))
    assert ts.gcide_entries(str(tmp_path)) == [
        ts.GcideEntry(
            "Accrue",
            ("To increase; to augment.", 'To come to by way of increase; as, "Interest accrues to principal."'),
            ("And though power failed, her courage did accrue.",),
        ),
        ts.GcideEntry("accretionary", (), ()),  # GCIDE's WordNet entries are left out
        ts.GcideEntry("Cafe", ("A coffee house; a cafe where aesthetes meet.",), ()),
    ]
    with pytest.raises(CorpusMissing, match="dict-gcide"):
        ts.gcide_entries(str(tmp_path / "none"))


# ---- the installed packages ----


@pytest.mark.skipif(not os.path.isfile(os.path.join(ts.GCIDE_DIR, "gcide.index")), reason="dict-gcide not installed (bash tools/install_corpora.sh)")
def test_installed_gcide():
    entries = ts.gcide_entries()
    assert len(entries) > 100000
    accrue = next(e for e in entries if e.headword == "Accrue" and "To increase; to augment." in e.definitions)
    assert "And though power failed, her courage did accrue." in accrue.quotations
    assert not any(c in t for e in entries for t in e.definitions + e.quotations for c in "[]{}\\")


@pytest.mark.skipif(not os.path.isfile("/usr/share/man/man1/ls.1.gz"), reason="no coreutils man pages")
def test_installed_man_pages_and_packages():
    pages = ts.man_page_names()
    ls = next(p for p in pages if p.path.endswith("/man1/ls.1.gz"))
    assert (ls.package, ls.text) == ("coreutils", "ls - list directory contents")
    assert len({p.path for p in pages}) == len(pages)
    assert any(p.name == "coreutils" and p.paragraphs for p in ts.debian_packages())
