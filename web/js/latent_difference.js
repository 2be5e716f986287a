// Shows Latent Difference's numbers on the node after a run: the server sends them in the node's "ui" output
// ({text, max_abs, mean_abs}), which the stock frontends do not display for a non-image node.
import { app } from "../../scripts/app.js";

const NODE = "ICLatentDifference";
const WIDGET = "result";

function show(node, text) {
    const before = [node.size[0], node.size[1]];   // LiteGraph's addWidget shrinks the node to its minimum
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        // A read-only text line drawn by LiteGraph itself (no DOM element); never sent to the server.
        widget = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
        widget.disabled = true;
        widget.serializeValue = () => undefined;
    }
    widget.value = text;
    const min = node.computeSize();
    node.setSize([Math.max(before[0], min[0]), Math.max(before[1], min[1])]);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "InversionChain.LatentDifference",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            onExecuted?.apply(this, arguments);
            const maxAbs = output?.max_abs?.[0];
            const meanAbs = output?.mean_abs?.[0];
            if (typeof maxAbs === "number" && typeof meanAbs === "number") {
                show(this, `max ${maxAbs.toExponential(2)}  mean ${meanAbs.toExponential(2)}`);
            } else if (output?.text?.[0]) {
                show(this, String(output.text[0]));
            }
        };
    },
});
