"""The adaptation modes by name, with their one-line help, readable without importing torch: `hftl modes` answers
at once. Each mode in hftl/adapt registers itself under one of these names (hftl.adapt.register_mode) and takes its help
from here; tests/test_cli.py checks that the names here are the registered ones."""

HELP = {
    "head": (
        "Frozen backbone (feature extraction): the head is solved on its cached features (logistic regression; "
        "multi-label: one per label; regression: ridge; penalty cross-validated or chosen on a given validation split; adapt.solve_head), read as the checkpoint was trained to give them "
        "(adapt.pooling); cheapest."
    ),
    "full": "Train every parameter (most accurate, most memory).",
    "lora": "peft LoRA adapters + full head; saved merged (adapt.save_adapter=true keeps the adapter too).",
    "ia3": (
        "peft IA3: learned scaling vectors on attention and feed-forward activations (fewest trainable "
        "parameters) + full head; saved merged (adapt.save_adapter=true keeps the adapter too)."
    ),
    "adalora": (
        "peft AdaLoRA: LoRA whose rank budget is reallocated to the most important matrices during training "
        "(adapt.peft_r: target average rank) + full head; saved merged (adapt.save_adapter=true keeps the "
        "adapter too). train.resume restarts AdaLoRA's importance estimates (peft keeps them outside the "
        "checkpoint), so a resumed run's ranks can differ from an uninterrupted one's."
    ),
    "loha": (
        "peft LoHa: low-rank Hadamard-product adapters (rank adapt.peft_r) + full head; saved merged "
        "(adapt.save_adapter=true keeps the adapter too)."
    ),
    "lokr": (
        "peft LoKr: low-rank Kronecker-product adapters (rank adapt.peft_r) + full head; saved merged "
        "(adapt.save_adapter=true keeps the adapter too)."
    ),
    "partial": "Train the top adapt.top_layers encoder layers + head; lower layers and embeddings stay frozen.",
    "gradual": (
        "ULMFiT gradual unfreezing: head first, then adapt.top_layers more layers every adapt.unfreeze_every "
        "epochs, embeddings last."
    ),
    "lpft": (
        "Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the head alone on the frozen backbone, "
        "solved on cached features as in head mode (adapt.solve_head=false: adapt.lp_epochs of AdamW at "
        "adapt.lp_learning_rate), then every parameter from that head for train.epochs; keeps pretrained features closer than full. Steps and "
        "history count across both stages. train.resume: the probe stage runs again (from its own checkpoints"
        " in <checkpoints>/linear-probe, if it was the stage stopped), then fine-tuning continues from the "
        "named or newest stage-2 checkpoint."
    ),
    "contrastive": (
        "Few labels (SetFit-style): tune the whole backbone on every pair of rows in each batch (same label: "
        "cosine similarity 1, other label: 0; SetFit's step count for adapt.pair_iterations rounds) with "
        "train.*, then solve the head on the tuned, frozen body."
    ),
}
