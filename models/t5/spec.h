// The T5EncoderModel spec (see spec.cc). Exposed so tests can inspect it without touching the
// global registry.
#pragma once

#include "handlers/registry.h"

namespace ds::t5 {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeT5EncoderModelSpec();

}  // namespace ds::t5
