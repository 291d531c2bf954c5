"""The printed tables of `olmoe analyze` (Markdown), one per analysis result."""

from __future__ import annotations

from olmoe_megatron.tables import markdown_table


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def saturation_table(result: dict) -> str:
    k = result["top_k"]
    layers = range(result["num_layers"])
    text = ""
    for key, title in (("top1", "k=1"), (f"top{k}", f"k={k}")):
        rows = [["checkpoint", "fraction"] + [f"L{layer}" for layer in layers]]
        for row in result["checkpoints"]:
            rows.append([f"step {row['step']}", f"{row['fraction']:.3f}"] + [_pct(v) for v in row[key]])
        text += f"router saturation (%), {title}, against {result['final']}\n" + markdown_table(rows)
    return text


def coactivation_table(result: dict) -> str:
    rows = [["layer", "top pair (i, j)", "co-activation %", "pairs over 2x chance"]]
    for entry in result["layers"]:
        pair = entry["top_pairs"][0] if entry["top_pairs"] else None
        rows.append([str(entry["layer"]), f"({pair['i']}, {pair['j']})" if pair else "-",
                     _pct(pair["coactivation"]) if pair else "-", str(entry["pairs_over_twice_chance"])])
    return (f"expert co-activation, N(Ei and Ej) / N(Ei), top-{result['top_k']} of {result['num_experts']} "
            f"(chance (k-1)/(E-1) = {_pct(result['chance'])}%)\n" + markdown_table(rows))


def domains_table(result: dict) -> str:
    rows = [["layer"] + [f"{name}: top expert %" for name in result["sources"]]]
    for entry in result["layers"]:
        rows.append([str(entry["layer"])] + [f"E{top['expert']} {_pct(top['value'])}" for top in entry["top"]])
    tokens = ", ".join(f"{n} {c:,}" for n, c in zip(result["sources"], result["tokens_per_source"]))
    return (f"domain specialisation, uniform k/E = {_pct(result['uniform'])}% (tokens: {tokens})\n"
            + markdown_table(rows))


def vocab_table(result: dict, *, experts_shown: int = 8, tokens_shown: int = 5) -> str:
    rows = [["layer", "mean spec. by input %", "mean spec. by predicted %"]]
    for entry in result["layers"]:
        rows.append([str(entry["layer"]), _pct(entry["input"]["mean_specialisation"]),
                     _pct(entry["predicted"]["mean_specialisation"])])
    text = "vocabulary specialisation\n" + markdown_table(rows)
    last = result["layers"][-1]
    rows = [["expert", "top input tokens", "top predicted tokens"]]
    for e in range(min(experts_shown, result["num_experts"])):
        cells = []
        for by in ("input", "predicted"):
            tokens = last[by]["experts"][e]["tokens"][:tokens_shown]
            cells.append(" ".join(f"{_show(t)}:{_pct(t['specialisation'])}" for t in tokens) or "-")
        rows.append([f"E{e}"] + cells)
    return text + f"layer {last['layer']}, most specialised tokens (id or text : %)\n" + markdown_table(rows)


def _show(token: dict) -> str:
    return repr(token["text"]) if token.get("text") is not None else str(token["id"])
