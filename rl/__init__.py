"""The RIG policy, its sequence format, losses and advantage estimation. Never imports Ray or DeepSpeed."""
