"""CG3D's deep visual prompts on transformers' PyTorch CLIP: the reference the Flax towers are tested and timed against.

Written as a loop over transformers' own vision layers (not a copy of our Flax code): prompts go right after the
class token once the position embedding is added, and before each later layer the prompt positions are replaced by
that layer's prompts.
"""

import torch


def torch_prompted_image_features(torch_model, pixel_values, prompts):
  """(B, 3, H, W) pixels, prompts (layers or 1, n, width) -> (B, projection_dim), not normalised."""
  vision = torch_model.vision_model
  x = vision.embeddings(pixel_values)  # class token + patches, position embedding added
  batch, n = x.shape[0], prompts.shape[1]
  x = torch.cat([x[:, :1], prompts[0].expand(batch, -1, -1), x[:, 1:]], dim=1)
  x = vision.pre_layrnorm(x)
  for i, layer in enumerate(vision.encoder.layers):
    if 0 < i < prompts.shape[0]:
      x = torch.cat([x[:, :1], prompts[i].expand(batch, -1, -1), x[:, 1 + n :]], dim=1)
    x = layer(x, None)
  return torch_model.visual_projection(vision.post_layernorm(x[:, 0]))
