"""Full re-resolution of every stored link (``IdentityGraph.rebuild``): read identifiers
and links, replay them in canonical order through the guarded union-find, write every
person, cluster and changed label back. Run in a child process on the store that
``identity_online`` left (or a fresh one built the same way) so the peak RSS printed
is the rebuild's own.

References measured in the same run on the same edges: scipy's and networkx's
``connected_components`` (plain, unguarded components: a floor, not a peer — they
decide nothing and write nothing). Goal: ≤ 10 s wall for 1,000,000 links, RSS ≤ 1 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.report import figure, header, peak_rss_mb

STORE = Path("var/bench/identity.db")


def _child() -> None:
    from sqlalchemy import delete, select, update

    from identity.models import IdentifierRow, LinkRow, PersonRow
    from identity.operations import IdentityOperations
    from stitchgraph.db import Database, DatabaseOptions

    db = Database(DatabaseOptions(url=f"sqlite:///{STORE}"))
    ops = IdentityOperations(db)
    figures = {}
    # 1. A consistent store: everything is read and replayed; persons are rewritten.
    started = time.perf_counter()
    with db.transaction() as session:
        stats = ops.rebuild(session)
    figures["consistent"] = time.perf_counter() - started
    figures["links"] = stats.links
    figures["identifiers"] = stats.identifiers
    figures["persons"] = stats.persons
    figures["unchanged_relabelled"] = stats.relabelled
    # 2. From evidence alone: derived state wiped first (every label is rewritten).
    with db.transaction() as session:
        session.execute(delete(PersonRow.__table__))
        session.execute(update(IdentifierRow.__table__).values(person_pk=-1))
        session.execute(update(LinkRow.__table__).values(decision="pending"))
    started = time.perf_counter()
    with db.transaction() as session:
        stats = ops.rebuild(session)
    figures["from_evidence"] = time.perf_counter() - started
    figures["from_evidence_relabelled"] = stats.relabelled
    figures["rss_mb"] = peak_rss_mb()
    # References: plain connected components over the same edges, loading excluded.
    with db.read() as session:
        edges = session.execute(select(LinkRow.a_pk, LinkRow.b_pk)).all()
        n = (session.execute(select(IdentifierRow.id).order_by(IdentifierRow.id.desc()).limit(1)).scalar() or 0) + 1
    import networkx as nx
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.fromiter((e[0] for e in edges), dtype=np.int64, count=len(edges))
    b = np.fromiter((e[1] for e in edges), dtype=np.int64, count=len(edges))
    started = time.perf_counter()
    matrix = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    connected_components(matrix, directed=False)
    figures["scipy"] = time.perf_counter() - started
    started = time.perf_counter()
    graph = nx.Graph()
    graph.add_edges_from(edges)
    sum(1 for _ in nx.connected_components(graph))
    figures["networkx"] = time.perf_counter() - started
    db.dispose()
    print(json.dumps(figures))


def run() -> None:
    if not STORE.exists():
        from bench import identity_online

        identity_online.run()
    header("identity_rebuild", f"full re-resolution of the stored evidence in {STORE}")
    result = subprocess.run([sys.executable, "-m", "bench.identity_rebuild", "--child"], capture_output=True,
                            text=True, check=True)
    f = json.loads(result.stdout.strip().splitlines()[-1])
    figure("links replayed", f["links"], "links")
    figure("identifiers / persons", f["identifiers"], f"identifiers, {f['persons']:,} persons")
    figure("rebuild of a consistent store (wall, read+replay+write)", f["consistent"], "s", goal="<= 10 s")
    figure("  identifiers relabelled (should be 0)", f["unchanged_relabelled"], "")
    figure("rebuild from evidence alone (wall)", f["from_evidence"], "s", goal="<= 10 s")
    figure("  identifiers relabelled", f["from_evidence_relabelled"], "")
    figure("peak RSS of the rebuild process", f["rss_mb"], "MiB", goal="<= 1024 MiB")
    figure("scipy connected_components (reference)", f["scipy"], "s")
    figure("networkx connected_components (reference)", f["networkx"], "s")
    figure("rebuild from evidence / scipy", f["from_evidence"] / f["scipy"], "ratio")
    figure("rebuild from evidence / networkx", f["from_evidence"] / f["networkx"], "ratio")


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child()
    else:
        run()
