// The CLIPVisionModelWithProjection spec (see spec.cc). Exposed so tests can inspect it without
// touching the global registry.
#pragma once

#include "handlers/registry.h"

namespace ds::clip_vision {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeClipVisionSpec();

}  // namespace ds::clip_vision
