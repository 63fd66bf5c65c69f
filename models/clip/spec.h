// The CLIP text model specs (see spec.cc). Exposed so tests can inspect them without touching the
// global registry.
#pragma once

#include "handlers/registry.h"

namespace ds::clip {

// Fresh copies of the specs that spec.cc registers.
ModelSpec MakeCLIPTextModelSpec();
ModelSpec MakeCLIPTextModelWithProjectionSpec();

}  // namespace ds::clip
