// The AutoencoderKL model's spec (see spec.cc). Exposed so tests can inspect it without touching
// the global registry.
#pragma once

#include "handlers/registry.h"

namespace ds::autoencoder_kl {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeAutoencoderKLSpec();

}  // namespace ds::autoencoder_kl
