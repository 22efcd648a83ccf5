"""The Experts tab: where the router sent each token of the latest reply, drawn as plain HTML.

`expert_view(engine, prompt_ids, reply_ids)` runs one cache-free forward pass over prompt + reply on the
engine's worker (`Engine.routing`) and returns `RoutingView`; `heatmap_html` draws tokens (columns) by layers
(rows), each cell colored by the token's first-choice expert, shaded by its weight, with every chosen expert
and weight in the cell's tooltip; `share_html` is the per-layer share of the reply's routing slots per expert.
"""

from __future__ import annotations

import colorsys
import html
from dataclasses import dataclass

import torch

# distinct hues for the first experts (Mixtral has 8); more are spread around the color wheel
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
MAX_COLUMNS = 160  # tokens drawn at most: the end of the prompt and the whole reply


@dataclass
class RoutingView:
    """Routing of prompt + reply: pieces (T,), expert_ids and weights (L, T, K), which tokens are the reply."""

    pieces: list[str]
    expert_ids: torch.Tensor  # (L, T, K) chosen experts, best first
    weights: torch.Tensor  # (L, T, K) mixing weights
    n_prompt: int
    n_experts: int

    @property
    def n_layers(self) -> int:
        return self.expert_ids.shape[0]


def expert_color(expert: int) -> str:
    if expert < len(PALETTE):
        return PALETTE[expert]
    r, g, b = colorsys.hls_to_rgb((expert * 0.618034) % 1.0, 0.5, 0.65)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _piece_text(tokenizer, token_id: int) -> str:
    piece = tokenizer.id_to_piece(token_id)
    return piece if tokenizer.is_special(token_id) else piece.replace("\u2581", " ")


def expert_view(engine, prompt_ids: list[int], reply_ids: list[int]) -> RoutingView | None:
    """The routing of prompt + reply (the reply's final EOS left out: it is never fed to the model).
    None for a dense model. Blocks until the engine's worker has run the pass (between two batch steps)."""
    eos = engine.eos_ids
    reply = list(reply_ids[:-1]) if reply_ids and reply_ids[-1] in eos else list(reply_ids)
    ids = [*prompt_ids, *reply]
    routing = engine.routing(ids)
    if not routing:
        return None
    expert_ids = torch.stack([r.expert_ids[0] for r in routing])  # (L, T, K)
    weights = torch.stack([r.weights[0] for r in routing])  # (L, T, K)
    pieces = [_piece_text(engine.tokenizer, i) for i in ids]
    return RoutingView(pieces, expert_ids, weights, len(prompt_ids), routing[0].logits.shape[-1])


def _legend(n_experts: int) -> str:
    items = "".join(f'<span class="mx-key"><i style="background:{expert_color(e)}"></i>expert {e}</span>'
                    for e in range(n_experts))
    return f'<div class="mx-legend">{items}</div>'


STYLE = """<style>
.mx-wrap{overflow-x:auto;max-width:100%}
.mx-heat{border-collapse:collapse;font:11px/1.2 ui-monospace,monospace}
.mx-heat td,.mx-heat th{border:1px solid #fff;padding:0;text-align:center;min-width:18px;height:18px}
.mx-heat th.tok{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;max-height:90px;
  white-space:pre;overflow:hidden;padding:2px 0;color:#333}
.mx-heat th.reply{color:#000;font-weight:bold;background:#f3f3f3}
.mx-heat th.layer{padding:0 4px;text-align:right;white-space:nowrap;font-weight:normal}
.mx-heat td{color:#fff}
.mx-legend{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0;font-size:12px}
.mx-key i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.mx-share{border-collapse:collapse;font:12px ui-monospace,monospace}
.mx-share td,.mx-share th{border:1px solid #ddd;padding:2px 6px;text-align:right}
</style>"""


def heatmap_html(view: RoutingView, max_columns: int = MAX_COLUMNS) -> str:
    """Tokens (x) by layers (y); a cell shows the first-choice expert's number on its color, opacity = its weight;
    the tooltip (title=) lists every chosen expert with its routing weight."""
    T = len(view.pieces)
    start = max(0, T - max_columns)
    head = ['<th class="layer">layer \\ token</th>']
    for t in range(start, T):
        kind = "reply" if t >= view.n_prompt else "prompt"
        label = html.escape(view.pieces[t] if view.pieces[t].strip() else "\u2423")
        title = html.escape(f"token {t} ({kind}): {view.pieces[t]!r}", quote=True)
        head.append(f'<th class="tok {kind}" title="{title}">{label}</th>')
    rows = ["<tr>" + "".join(head) + "</tr>"]
    expert_ids, weights = view.expert_ids.tolist(), view.weights.tolist()
    for layer in range(view.n_layers):
        cells = [f'<th class="layer">{layer}</th>']
        for t in range(start, T):
            chosen, w = expert_ids[layer][t], weights[layer][t]
            kind = "reply" if t >= view.n_prompt else "prompt"
            tip = f"token {t} ({kind}) {view.pieces[t]!r} · layer {layer}: " + ", ".join(
                f"expert {e} ({x:.2f})" for e, x in zip(chosen, w))
            alpha = 0.35 + 0.65 * float(w[0])
            cells.append(f'<td class="cell" data-layer="{layer}" data-token="{t}" '
                         f'title="{html.escape(tip, quote=True)}" style="background:{expert_color(chosen[0])};'
                         f'opacity:{alpha:.2f}">{chosen[0]}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    n_reply = T - view.n_prompt
    shown = f"the last {T - start} of {T} tokens" if start else f"all {T} tokens"
    caption = (f"<p>{view.n_layers} layers × {shown} ({view.n_prompt} prompt, {n_reply} reply; reply tokens in "
               "bold). Each cell: the token's first-choice expert, more opaque = larger routing weight; hover a "
               "cell for all chosen experts and their weights.</p>")
    return (f'{STYLE}<div id="expert-heatmap">{caption}{_legend(view.n_experts)}<div class="mx-wrap">'
            f'<table class="mx-heat">{"".join(rows)}</table></div></div>')


def expert_shares(view: RoutingView) -> torch.Tensor:
    """(L, E): per layer, the fraction of the reply's routing slots (token x top-K) each expert got; the prompt's
    when the reply is empty. Rows sum to 1."""
    first = view.n_prompt if len(view.pieces) > view.n_prompt else 0
    chosen = view.expert_ids[:, first:]  # (L, T', K)
    counts = torch.zeros(view.n_layers, view.n_experts)
    counts.scatter_add_(1, chosen.reshape(view.n_layers, -1), torch.ones(chosen.reshape(view.n_layers, -1).shape))
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def share_html(view: RoutingView) -> str:
    """Table: layers (rows) by experts (columns), each cell the expert's share of the reply's routing slots,
    shaded by how far above the even share (1/E) it is."""
    shares = expert_shares(view)
    even = 1.0 / view.n_experts
    header = "".join(f'<th style="color:{expert_color(e)}">expert {e}</th>' for e in range(view.n_experts))
    rows = []
    for layer, row in enumerate(shares.tolist()):
        cells = []
        for share in row:
            strength = min(1.0, share / (2 * even)) if even else 0.0
            cells.append(f'<td style="background:rgba(31,119,180,{0.6 * strength:.2f})">{share:.0%}</td>')
        rows.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    scope = "reply" if len(view.pieces) > view.n_prompt else "prompt"
    return (f'{STYLE}<div id="expert-share"><p>Share of the {scope}\'s routing slots (tokens × top-K) per expert; '
            f"an even split is {even:.0%}.</p><table class=\"mx-share\"><tr><th>layer</th>{header}</tr>"
            f"{''.join(rows)}</table></div>")


EMPTY_HTML = ('<div id="expert-empty"><p>Send a message on the Chat tab; the routing of the latest reply shows '
              "here.</p></div>")


def unavailable_html(reason: str) -> str:
    return f'<div id="expert-empty"><p>{html.escape(reason)}</p></div>'
