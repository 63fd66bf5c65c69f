// The Flux model's spec (see spec.cc). Exposed so tests can build variants of it (e.g. with other
// handlers wired) without touching the global registry.
#pragma once

#include "handlers/registry.h"

namespace ds::flux {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeFluxSpec();

}  // namespace ds::flux
