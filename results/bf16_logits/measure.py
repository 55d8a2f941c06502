"""How often bfloat16 logits tie at test time, and what argmax's tie rule does to accuracy.

Trains ConvNets on a released set as evaluate.py does (DM protocol, float32 training, `--epochs` epochs), then
classifies the test split twice under bfloat16 autocast: the whole network in bfloat16 (evaluations before
the classifier moved to float32) and the features in bfloat16 with the linear classifier in float32. Writes
results.json beside this file. Run from the repository root:

    python results/bf16_logits/measure.py --syn results/sets/cifar10-if200-ipc10-csdm.pt --data-dir data/cifar10
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data_lt import load_long_tailed  # noqa: E402
from networks import autocast, build_network, reset_parameters_  # noqa: E402
from runs import environment  # noqa: E402
from training import PROTOCOLS, long_tail_groups, train_network  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--syn", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--networks", type=int, default=2)
    args = parser.parse_args()
    synthetic = torch.load(args.syn, map_location="cpu", weights_only=True)
    config = synthetic["config"]
    data = load_long_tailed(config["dataset"], args.data_dir, config["imbalance_factor"], config["seed"],
                            log=lambda m: None)
    test_x, test_y = data.normalise(data.test_images), data.test_labels
    head = long_tail_groups(data.class_counts)["head"]
    rows, start = [], time.time()
    for k in range(args.networks):
        generator = torch.Generator().manual_seed(k)
        net = reset_parameters_(build_network("convnet", data.channels, data.num_classes, data.image_size), generator)
        train_network(net, synthetic["images"], synthetic["labels"], generator, PROTOCOLS["dm"], args.epochs)
        net.eval()
        with torch.no_grad(), autocast(test_x.device, "bf16"):
            logits_bf16 = torch.cat([net(x) for x in test_x.split(500)])
            features = torch.cat([net.embed(x) for x in test_x.split(500)])
        with torch.no_grad():
            logits_fp32 = net.classifier(features.float())
        top2 = logits_bf16.float().topk(2, dim=1).values
        old, new = logits_bf16.argmax(1), logits_fp32.argmax(1)
        rows.append(dict(network=k, ties=int((top2[:, 0] == top2[:, 1]).sum()), test_images=len(test_y),
                         changed=int((old != new).sum()),
                         accuracy_bf16_logits=100 * float((old == test_y).double().mean()),
                         accuracy_fp32_classifier=100 * float((new == test_y).double().mean()),
                         head_predictions_bf16=int(sum((old == c).sum() for c in head)),
                         head_predictions_fp32=int(sum((new == c).sum() for c in head))))
        print(rows[-1], flush=True)
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), syn=args.syn, epochs=args.epochs, rows=rows,
                                   seconds=round(time.time() - start), environment=environment()), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
