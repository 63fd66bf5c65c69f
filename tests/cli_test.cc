// diffusion-cli end to end: describe prints the registry's metadata; forward reproduces the golden
// outputs through the files users pass it; lora convert writes every golden LoRA case as a
// diffusers/PEFT file whose deltas are the golden ones; encode-prompt writes the golden text
// encodings, usable as generate --inputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "handlers/lora_format.h"
#include "handlers/registry.h"
#include "handlers/image.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "testing/lora_golden.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::Close;
using ::ds::test::ExpectedLoraFormat;
using ::ds::test::F64;
using ::ds::test::GoldenDir;
using ::ds::test::kLoraRelativeTolerance;
using ::ds::test::LoraGoldenCases;
using ::ds::test::LoraGoldenDir;
using ::ds::test::SwapHalves;
using ::ds::test::TempDir;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct Result {
  int exit_code = -1;
  std::string out;  // stdout and stderr together
};

Result RunCli(const std::string& args) {
  Result r;
  const std::string cmd = std::string(DS_CLI_PATH) + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.out.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

TEST(CliTest, DescribePrintsTheRegistryMetadata) {
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(spec.ok());
  Result r = RunCli("describe FluxTransformer2DModel --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out, BuildModelMetadata(**spec).Render(false));
  Result v = RunCli("describe flux --verbose --threads 1");
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_EQ(v.out, BuildModelMetadata(**spec).Render(true));
}

TEST(CliTest, DescribeList) {
  Result r = RunCli("describe --list --threads 1");
  EXPECT_EQ(r.exit_code, 0);
  for (const ModelSpec* spec : ModelRegistry::Global().List()) {
    EXPECT_THAT(r.out, HasSubstr(spec->class_name));
  }
}

TEST(CliTest, UnknownModelAndBadUsage) {
  Result r = RunCli("describe NoSuchModel --threads 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.out, HasSubstr("NoSuchModel"));
  EXPECT_EQ(RunCli("frobnicate").exit_code, 2);
  Result f = RunCli("forward --inputs x --output y --threads 1");
  EXPECT_EQ(f.exit_code, 1);
  EXPECT_THAT(f.out, HasSubstr("--model"));
  Result bad = RunCli("forward --model /nonexistent/dir --inputs x --output y --threads 1");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("/nonexistent/dir"));
}

TEST(CliTest, ForwardReproducesEveryGoldenCase) {
  const fs::path root = fs::path(GoldenDir()) / "flux";
  ASSERT_TRUE(fs::is_directory(root)) << root;
  TempDir tmp;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path io = entry.path() / "io.safetensors";
    if (!fs::exists(entry.path() / "transformer" / "config.json") || !fs::exists(io)) continue;
    ++cases;
    const std::string out = tmp.path() + "/" + entry.path().filename().string() + ".safetensors";
    Result r = RunCli("forward --model " + (entry.path() / "transformer").string() + " --inputs " +
                      io.string() + " --output " + out + " --repeat 2 --threads 1");
    ASSERT_EQ(r.exit_code, 0) << entry.path() << ": " << r.out;
    EXPECT_THAT(r.out, HasSubstr("median seconds per forward"));
    auto ours = SafetensorsFile::Open(out);
    auto golden = SafetensorsFile::Open(io.string());
    ASSERT_TRUE(ours.ok() && golden.ok());
    torch::Tensor a = *(*ours)->Get("output");
    torch::Tensor b = *(*golden)->Get("output");
    ASSERT_EQ(a.sizes(), b.sizes()) << entry.path();
    const double tol = 1e-4 * b.abs().max().item<double>();
    EXPECT_LE((a - b).abs().max().item<double>(), tol) << entry.path();
  }
  EXPECT_GT(cases, 0);
}

TEST(CliTest, InspectAndConvertSingleFiles) {
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  ASSERT_TRUE(fs::is_directory(root)) << root;
  TempDir tmp;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path original = entry.path() / "original.safetensors";
    if (!fs::exists(original)) continue;
    ++cases;
    auto golden = ReadJsonFile((entry.path() / "config.json").string());
    ASSERT_TRUE(golden.ok());
    const std::string variant = (*golden)["detected_model_type"].get<std::string>();
    Result r = RunCli("inspect " + original.string() + " --json --threads 1");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const nlohmann::json report = nlohmann::json::parse(r.out);
    EXPECT_EQ(report["variant"], variant) << entry.path();
    EXPECT_EQ(report["model_class"], "FluxTransformer2DModel");

    // convert, then run forward on the converted folder against the case's golden output.
    const std::string axes = (*golden)["model_config"]["axes_dims_rope"].dump();
    const std::string out_dir = tmp.File(entry.path().filename().string());
    Result c = RunCli("convert " + original.string() + " " + out_dir +
                      " --config '{\"axes_dims_rope\": " + axes + "}' --threads 1");
    ASSERT_EQ(c.exit_code, 0) << c.out;
    const fs::path io = entry.path() / "io.safetensors";
    if (!fs::exists(io)) continue;
    const std::string out = out_dir + "/out.safetensors";
    Result f = RunCli("forward --model " + out_dir + " --inputs " + io.string() + " --output " +
                      out + " --threads 1");
    ASSERT_EQ(f.exit_code, 0) << f.out;
    auto ours = SafetensorsFile::Open(out);
    auto want = SafetensorsFile::Open(io.string());
    ASSERT_TRUE(ours.ok() && want.ok());
    torch::Tensor a = *(*ours)->Get("output");
    torch::Tensor b = *(*want)->Get("output");
    EXPECT_LE((a - b).abs().max().item<double>(), 1e-4 * b.abs().max().item<double>());
  }
  EXPECT_GT(cases, 0);
  Result bad = RunCli("inspect " + tmp.File("absent.safetensors") + " --threads 1");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("NOT_FOUND"));
}

// ---------------------------------------------------------------------------------------------
// lora inspect / convert over every golden LoRA case (../shared/golden/README.md "lora/").

TensorMap ReadTensors(const fs::path& path) {
  auto tensors = LoadSafetensorsWeights(path.string());
  EXPECT_TRUE(tensors.ok()) << path << ": " << tensors.status();
  return tensors.ok() ? *tensors : TensorMap{};
}

nlohmann::json ReadJson(const fs::path& path) {
  auto json = ReadJsonFile(path.string());
  EXPECT_TRUE(json.ok()) << path << ": " << json.status();
  return json.ok() ? *json : nlohmann::json::object();
}

// One module of a diffusers/PEFT LoRA state dict.
struct PeftModule {
  torch::Tensor down;  // lora_A.weight
  torch::Tensor up;    // lora_B.weight
  torch::Tensor bias;  // lora_B.bias (optional)
};

// Splits a diffusers/PEFT state dict into LoRA modules and whole parameters (replacements),
// stripping `prefix` where a key has it.
void SplitPeft(const TensorMap& state_dict, const std::string& prefix,
               std::map<std::string, PeftModule>* modules,
               std::map<std::string, torch::Tensor>* params) {
  for (const auto& [key, tensor] : state_dict) {
    const std::string name = absl::StartsWith(key, prefix) ? key.substr(prefix.size()) : key;
    auto module = [&](const char* suffix) -> PeftModule& {
      return (*modules)[name.substr(0, name.size() - std::strlen(suffix))];
    };
    if (absl::EndsWith(name, ".lora_A.weight")) {
      module(".lora_A.weight").down = tensor;
    } else if (absl::EndsWith(name, ".lora_B.weight")) {
      module(".lora_B.weight").up = tensor;
    } else if (absl::EndsWith(name, ".lora_B.bias")) {
      module(".lora_B.bias").bias = tensor;
    } else {
      (*params)[name] = tensor;
    }
  }
}

// The golden effect of one module: the change of its weight (and bias).
struct GoldenDelta {
  torch::Tensor weight;
  torch::Tensor bias;
};

// alpha / r of the kohya module `bfl_name` ("final_layer.linear") in `input`, in any kohya spelling
// (sd-scripts' '_' or ComfyUI's '.' separators); 1 without an alpha.
double KohyaScale(const TensorMap& input, const std::string& bfl_name) {
  const std::string flat = absl::StrReplaceAll(bfl_name, {{".", "_"}});
  double alpha = -1;
  int64_t rank = 0;
  for (const auto& [key, tensor] : input) {
    const std::string k = absl::StrReplaceAll(key, {{".", "_"}});
    if (absl::EndsWith(k, "_" + flat + "_alpha")) alpha = tensor.item<double>();
    if (absl::EndsWith(k, "_" + flat + "_lora_down_weight")) rank = tensor.size(0);
  }
  EXPECT_GT(rank, 0) << "no lora_down for " << bfl_name;
  return alpha < 0 || rank == 0 ? 1.0 : alpha / static_cast<double>(rank);
}

// What the LoRA of case `dir` must do to the base model `base`, as the golden README states it:
// merged.safetensors - base for every module diffusers applies, corrected where diffusers is
// deliberately not followed, and diffusers' converted tensors for the modules its loader drops.
// `replaced` receives the parameters the LoRA replaces as a whole.
std::map<std::string, GoldenDelta> GoldenDeltas(const fs::path& dir, const TensorMap& base,
                                                std::map<std::string, torch::Tensor>* replaced) {
  const nlohmann::json expected = ReadJson(dir / "expected.json");
  const TensorMap input = ReadTensors(dir / "input.safetensors");
  const TensorMap merged = ReadTensors(dir / "merged.safetensors");
  std::map<std::string, PeftModule> converted;
  std::map<std::string, torch::Tensor> converted_params;
  SplitPeft(ReadTensors(dir / "converted.safetensors"), "transformer.", &converted,
            &converted_params);

  std::set<std::string> whole;  // parameters the LoRA replaces (norm scales)
  for (const auto& p : expected["norm_keys_loaded"]) whole.insert(p.get<std::string>());

  std::map<std::string, GoldenDelta> deltas;
  for (const auto& [param, value] : merged) {
    if (whole.count(param) > 0) {
      (*replaced)[param] = value;
      continue;
    }
    auto it = base.find(param);
    if (it == base.end()) {
      ADD_FAILURE() << param << " is in merged.safetensors but not in the base model";
      continue;
    }
    torch::Tensor w = F64(it->second);
    if (w.dim() == 2 && value.size(1) > w.size(1)) {  // a widened input: zero columns
      w = torch::cat({w, torch::zeros({w.size(0), value.size(1) - w.size(1)}, w.options())}, 1);
    }
    const std::size_t dot = param.rfind('.');
    GoldenDelta& d = deltas[param.substr(0, dot)];
    (param.substr(dot + 1) == "weight" ? d.weight : d.bias) = F64(value) - w;
  }

  // Deliberate difference 2: where the semantic check finds diffusers' fused weight wrong (the BFL
  // final adaLN, whose lora_A diffusers half-swaps as well), the right delta is diffusers' lora_B
  // with the source lora_A, i.e. lora_A swapped back.
  const nlohmann::json semantic =
      expected["semantic_check"].value("max_abs_diff", nlohmann::json::object());
  for (auto& [module, d] : deltas) {
    const double error = semantic.value(module, 0.0);
    if (!d.weight.defined() ||
        error <= kLoraRelativeTolerance * d.weight.abs().max().item<double>()) {
      continue;
    }
    EXPECT_EQ(module, "norm_out.linear") << "the golden README documents no other fix";
    auto c = converted.find(module);
    if (c == converted.end() || !expected["per_module"].contains(module)) {
      ADD_FAILURE() << module << ": no diffusers conversion to correct";
      continue;
    }
    const double scaling = expected["per_module"][module]["scaling"].get<double>();
    const torch::Tensor right = F64(c->second.up).matmul(SwapHalves(F64(c->second.down))) * scaling;
    EXPECT_FALSE(Close(d.weight, right)) << module << ": diffusers was expected to differ here";
    d.weight = right;
  }

  // Deliberate differences 1 and 3: kohya modules diffusers converts without the "transformer."
  // prefix (so its loader drops them) are applied; their converted tensors carry the kohya alpha
  // except on the two final-layer modules, whose alpha diffusers ignores.
  const std::map<std::string, std::string> final_layer = {
      {"proj_out", "final_layer.linear"}, {"norm_out.linear", "final_layer.adaLN_modulation.1"}};
  for (const auto& m :
       expected["semantic_check"].value("not_applied_by_diffusers", nlohmann::json::array())) {
    const std::string module = m.get<std::string>();
    EXPECT_EQ(deltas.count(module), 0u) << module << " is dropped by diffusers yet merged";
    auto it = converted.find(module);
    if (it == converted.end()) {
      ADD_FAILURE() << module << " is not in converted.safetensors";
      continue;
    }
    auto fl = final_layer.find(module);
    const double scale = fl == final_layer.end() ? 1.0 : KohyaScale(input, fl->second);
    GoldenDelta& d = deltas[module];
    d.weight = F64(it->second.up).matmul(F64(it->second.down)) * scale;
    if (it->second.bias.defined()) d.bias = F64(it->second.bias) * scale;
  }
  return deltas;
}

std::string LoraModelDir() { return (LoraGoldenDir() / "base_model_dir").string(); }

TEST(CliTest, LoraConvertWritesTheGoldenDeltasOfEveryCase) {
  const std::vector<std::string> cases = LoraGoldenCases();
  ASSERT_FALSE(cases.empty()) << "no LoRA cases under " << LoraGoldenDir();
  const TensorMap base = ReadTensors(LoraGoldenDir() / "base_model.safetensors");
  ASSERT_FALSE(base.empty());
  const nlohmann::json config = ReadJson(fs::path(LoraModelDir()) / "transformer" / "config.json");
  auto spec = ModelRegistry::Global().Find(config.value("_class_name", ""));
  ASSERT_TRUE(spec.ok()) << spec.status();
  const LoraHandler* lora_handler = (*spec)->lora;
  ASSERT_NE(lora_handler, nullptr) << (*spec)->class_name << " wires no LoRA handler";
  TempDir tmp;
  for (const std::string& name : cases) {
    SCOPED_TRACE(name);
    const fs::path dir = LoraGoldenDir() / name;
    const std::string input = (dir / "input.safetensors").string();
    const std::string out = tmp.File(name + ".safetensors");
    const std::string args =
        "lora convert " + input + " --model " + LoraModelDir() + " -o " + out + " --threads 1";
    Result r = RunCli(args);
    if (r.exit_code != 0) {
      // Keys that do not apply to the model: strict loading lists them, partial loading the rest.
      EXPECT_THAT(r.out, HasSubstr("unmatched"));
      r = RunCli(args + " --allow-partial");
    }
    ASSERT_EQ(r.exit_code, 0) << r.out;
    EXPECT_THAT(r.out, HasSubstr("wrote " + out));

    auto file = SafetensorsFile::Open(out);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((*file)->metadata().count("converted_from"), 1u);
    auto written = (*file)->GetAll();
    ASSERT_TRUE(written.ok()) << written.status();
    for (const auto& [key, t] : *written) EXPECT_TRUE(absl::StartsWith(key, "transformer.")) << key;
    std::map<std::string, PeftModule> ours;
    std::map<std::string, torch::Tensor> ours_params;
    SplitPeft(*written, "transformer.", &ours, &ours_params);

    std::map<std::string, torch::Tensor> replaced;
    const std::map<std::string, GoldenDelta> golden = GoldenDeltas(dir, base, &replaced);
    std::set<std::string> ours_names, golden_names;
    for (const auto& [m, p] : ours) ours_names.insert(m);
    for (const auto& [m, d] : golden) golden_names.insert(m);
    EXPECT_EQ(ours_names, golden_names);

    // The written file means lora_alpha = r (scale 1): its delta is B·A, its bias delta
    // lora_B.bias.
    for (const auto& [module, d] : golden) {
      SCOPED_TRACE(module);
      auto it = ours.find(module);
      if (it == ours.end()) continue;
      const PeftModule& p = it->second;
      ASSERT_TRUE(p.down.defined() && p.up.defined());
      EXPECT_TRUE(Close(F64(p.up).matmul(F64(p.down)), d.weight));
      EXPECT_EQ(p.bias.defined(), d.bias.defined());
      if (p.bias.defined() && d.bias.defined()) {
        EXPECT_TRUE(Close(p.bias, d.bias));
      }
    }
    std::set<std::string> ours_replaced, golden_replaced;
    for (const auto& [param, t] : ours_params) ours_replaced.insert(param);
    for (const auto& [param, t] : replaced) golden_replaced.insert(param);
    EXPECT_EQ(ours_replaced, golden_replaced);
    for (const auto& [param, value] : replaced) {
      if (ours_params.count(param) > 0) {
        EXPECT_TRUE(Close(ours_params.at(param), value)) << param;
      }
    }

    // The written file reads back, with the handler of the model's spec, as a diffusers LoRA with
    // scale 1 everywhere and nothing left over.
    auto again = ConvertLoraFile(out, *lora_handler);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->format, kDiffusersLoraFormat);
    EXPECT_TRUE(again->unused.empty());
    EXPECT_EQ(again->modules.size(), golden.size());
    for (const LoraModule& m : again->modules) EXPECT_EQ(m.scale, 1.0) << m.module;
  }
}

// forward --lora applies each golden LoRA unfused and reproduces intended_forward; two adapters
// at half weight stack to the same output as one at full weight.
TEST(CliTest, ForwardWithLoraReproducesIntendedForward) {
  const std::vector<std::string> cases = LoraGoldenCases();
  ASSERT_FALSE(cases.empty());
  test::TempDir tmp;
  for (const std::string& c : cases) {
    SCOPED_TRACE(c);
    const fs::path dir = LoraGoldenDir() / c;
    TensorMap inputs = ReadTensors(dir / "forward.safetensors");
    inputs.erase("output");
    const std::string in = tmp.File(c + "_in.safetensors");
    ASSERT_TRUE(WriteSafetensors(in, inputs).ok());
    const torch::Tensor intended =
        ReadTensors(dir / "intended_forward.safetensors").at("output").to(torch::kDouble);
    const std::string lora = (dir / "input.safetensors").string();
    const std::string out1 = tmp.File(c + "_1.safetensors"), out2 = tmp.File(c + "_2.safetensors");
    Result one = RunCli("forward --model " + LoraModelDir() + " --inputs " + in + " --output " +
                        out1 + " --lora " + lora);
    ASSERT_EQ(one.exit_code, 0) << one.out;
    EXPECT_THAT(one.out, HasSubstr("applied with weight 1"));
    const torch::Tensor y1 = ReadTensors(out1).at("output").to(torch::kDouble);
    const double scale = intended.abs().max().item<double>();
    EXPECT_LE((y1 - intended).abs().max().item<double>(), 1e-5 * scale);
    if (c != "diffusers") continue;  // stacking once is enough (a CLI run costs ~1 s)
    Result two = RunCli("forward --model " + LoraModelDir() + " --inputs " + in + " --output " +
                        out2 + " --lora " + lora + ":0.5 --lora=" + lora + ":0.5");
    ASSERT_EQ(two.exit_code, 0) << two.out;
    const torch::Tensor y2 = ReadTensors(out2).at("output").to(torch::kDouble);
    EXPECT_LE((y2 - y1).abs().max().item<double>(), 1e-5 * scale);
  }
  // A LoRA that does not fit the model fails naming the problem.
  Result bad = RunCli("forward --model " + LoraModelDir() + " --inputs " +
                      tmp.File(cases.front() + "_in.safetensors") + " --output " +
                      tmp.File("bad.safetensors") + " --lora " +
                      (LoraGoldenDir() / "base_model.safetensors").string());
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("unknown LoRA format"));
}

TEST(CliTest, LoraInspectReportsTheDetectedFormatOfEveryCase) {
  const std::vector<std::string> cases = LoraGoldenCases();
  ASSERT_FALSE(cases.empty()) << "no LoRA cases under " << LoraGoldenDir();
  for (const std::string& name : cases) {
    SCOPED_TRACE(name);
    const fs::path dir = LoraGoldenDir() / name;
    const nlohmann::json expected = ReadJson(dir / "expected.json");
    const std::string format = ExpectedLoraFormat(expected);
    const std::string input = (dir / "input.safetensors").string();
    Result r = RunCli("lora inspect " + input + " --model " + LoraModelDir() +
                      " --allow-partial --json --threads 1");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const nlohmann::json report = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_FALSE(report.is_discarded()) << r.out;
    EXPECT_EQ(report["format"], format);
    EXPECT_EQ(report["path"], input);
    EXPECT_FALSE(report["modules"].empty());
    EXPECT_EQ(report["expanded_modules"], expected["expanded_modules"]);
    EXPECT_TRUE(report["unmatched"].empty()) << report["unmatched"];

    if (name == cases.front()) {  // the human-readable report (one case: each run loads LibTorch)
      Result text = RunCli("lora inspect " + input + " --model " + LoraModelDir() + " --threads 1");
      ASSERT_EQ(text.exit_code, 0) << text.out;
      EXPECT_THAT(text.out, HasSubstr("format " + format + ": "));
    }
  }
}

TEST(CliTest, LoraErrorsAndPartialLoading) {
  const std::string model = LoraModelDir();
  TempDir tmp;

  // Not a LoRA: the base model's own weights. Unknown format; the message shows sample keys as
  // they appear in the file, and convert writes nothing.
  const std::string weights = (LoraGoldenDir() / "base_model.safetensors").string();
  const TensorMap base = ReadTensors(weights);
  ASSERT_FALSE(base.empty());
  Result unknown = RunCli("lora inspect " + weights + " --model " + model + " --threads 1");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.out, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(unknown.out, HasSubstr("unknown LoRA format"));
  EXPECT_THAT(unknown.out, HasSubstr("sample keys"));
  EXPECT_TRUE(std::any_of(base.begin(), base.end(), [&](const auto& kv) {
    return unknown.out.find("'" + kv.first + "'") != std::string::npos;
  })) << unknown.out;
  const std::string not_written = tmp.File("not_written.safetensors");
  Result unknown_convert =
      RunCli("lora convert " + weights + " --model " + model + " -o " + not_written);
  EXPECT_EQ(unknown_convert.exit_code, 1);
  EXPECT_THAT(unknown_convert.out, HasSubstr("unknown LoRA format"));
  EXPECT_FALSE(fs::exists(not_written));

  // One module the model has and one it lacks (a block index past the model's blocks).
  const std::string present = "transformer_blocks.0.attn.to_q";
  ASSERT_EQ(base.count(present + ".weight"), 1u);
  int missing_block = 0;
  while (base.count("transformer_blocks." + std::to_string(missing_block) + ".attn.to_q.weight")) {
    ++missing_block;
  }
  const std::string absent = "transformer_blocks." + std::to_string(missing_block) + ".attn.to_q";
  const torch::Tensor w = base.at(present + ".weight");
  const int64_t rank = 2;
  const std::string partial = tmp.File("partial.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(
          partial,
          TensorMap{{"transformer." + present + ".lora_A.weight", torch::randn({rank, w.size(1)})},
                    {"transformer." + present + ".lora_B.weight", torch::randn({w.size(0), rank})},
                    {"transformer." + absent + ".lora_A.weight", torch::randn({rank, w.size(1)})},
                    {"transformer." + absent + ".lora_B.weight", torch::randn({w.size(0), rank})}})
          .ok());
  Result strict = RunCli("lora inspect " + partial + " --model " + model + " --threads 1");
  EXPECT_EQ(strict.exit_code, 1);
  EXPECT_THAT(strict.out, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(strict.out, HasSubstr(absent));
  for (const std::string flag : {"--allow-partial", "--allow_partial"}) {
    Result r = RunCli("lora inspect " + partial + " --model " + model + " " + flag +
                      " --json --threads 1");
    ASSERT_EQ(r.exit_code, 0) << flag << ": " << r.out;
    const nlohmann::json report = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_FALSE(report.is_discarded()) << r.out;
    ASSERT_EQ(report["modules"].size(), 1u);
    EXPECT_EQ(report["modules"][0]["module"], present);
    EXPECT_EQ(report["unmatched"].count(absent), 1u) << report["unmatched"];
  }
  const std::string converted = tmp.File("converted.safetensors");
  Result c = RunCli("lora convert " + partial + " --model " + model +
                    " --allow-partial --output=" + converted + " --threads 1");
  ASSERT_EQ(c.exit_code, 0) << c.out;
  auto file = SafetensorsFile::Open(converted);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT((*file)->names(),
              ::testing::UnorderedElementsAre("transformer." + present + ".lora_A.weight",
                                              "transformer." + present + ".lora_B.weight"));

  // Usage errors.
  Result no_model = RunCli("lora inspect " + partial + " --threads 1");
  EXPECT_EQ(no_model.exit_code, 1);
  EXPECT_THAT(no_model.out, HasSubstr("--model"));
  Result no_output = RunCli("lora convert " + partial + " --model " + model + " --threads 1");
  EXPECT_EQ(no_output.exit_code, 1);
  EXPECT_THAT(no_output.out, HasSubstr("-o"));
  Result absent_file =
      RunCli("lora inspect " + tmp.File("absent.safetensors") + " --model " + model);
  EXPECT_EQ(absent_file.exit_code, 1);
  EXPECT_THAT(absent_file.out, HasSubstr("NOT_FOUND"));
  Result not_a_model = RunCli("lora inspect " + partial + " --model " + tmp.path());
  EXPECT_EQ(not_a_model.exit_code, 1);
  EXPECT_THAT(not_a_model.out, HasSubstr("NOT_FOUND"));
  EXPECT_EQ(RunCli("lora").exit_code, 2);
  EXPECT_EQ(RunCli("lora merge " + partial).exit_code, 2);
}

// --- tokenize ---

// `text` as one single-quoted shell word.
std::string ShellQuote(const std::string& text) {
  return "'" + absl::StrReplaceAll(text, {{"'", "'\\''"}}) + "'";
}

// The id lines of a tokenize run (truncation notes on stderr come interleaved as "note: ...").
std::vector<std::vector<int64_t>> IdLines(const std::string& out) {
  std::vector<std::vector<int64_t>> lines;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "note: ")) continue;
    std::vector<int64_t> ids;
    std::istringstream words(line);
    for (int64_t id; words >> id;) ids.push_back(id);
    lines.push_back(ids);
  }
  return lines;
}

std::vector<int64_t> Row(const torch::Tensor& t, int64_t row) {
  torch::Tensor r = t[row].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

TEST(CliTest, TokenizePrintsTheGoldenIdsOfEveryString) {
  const std::string dir = GoldenDir() + "/conditioning/tokenizers";
  std::ifstream json_in(dir + "/tokens.json");
  const nlohmann::json strings = nlohmann::json::parse(json_in)["strings"];
  auto ids = SafetensorsFile::Open(dir + "/ids.safetensors");
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::string texts;
  for (const auto& s : strings) texts += " " + ShellQuote(s["text"].get<std::string>());

  struct Run {
    std::string flags;
    std::string golden;  // 2-D tensor: one row per string
  };
  for (const Run& run : {Run{"--tokenizer " + dir + "/clip_tokenizer", "clip_padded"},
                         Run{"--tokenizer " + dir + "/t5_tokenizer", "t5_padded_512"},
                         Run{"--tokenizer=" + dir + "/t5_tokenizer --max-sequence-length 32",
                             "t5_padded_32"}}) {
    SCOPED_TRACE(run.flags);
    Result r = RunCli("tokenize " + run.flags + texts);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const auto lines = IdLines(r.out);
    auto golden = (*ids)->Get(run.golden);
    ASSERT_TRUE(golden.ok()) << golden.status();
    ASSERT_EQ(static_cast<int64_t>(lines.size()), golden->size(0));
    for (int64_t i = 0; i < golden->size(0); ++i) {
      EXPECT_EQ(lines[i], Row(*golden, i)) << "string " << i;
    }
    EXPECT_THAT(r.out, HasSubstr("note: text 24 truncated"));  // the 1471-token prompt
  }
}

TEST(CliTest, TokenizeWithThePipelineFolderMatchesThePipelineRun) {
  const std::string root = GoldenDir() + "/pipeline/flux_pipeline_text";
  auto run = SafetensorsFile::Open(root + "/cat.safetensors");
  ASSERT_TRUE(run.ok()) << run.status();
  const std::string prompt = ShellQuote("a photo of a cat");
  Result clip = RunCli("tokenize --tokenizer " + root + "/flux_tiny/tokenizer " + prompt);
  Result t5 = RunCli("tokenize --tokenizer " + root + "/flux_tiny/tokenizer_2 " +
                     "--max_sequence_length 32 " + prompt);
  ASSERT_EQ(clip.exit_code, 0) << clip.out;
  ASSERT_EQ(t5.exit_code, 0) << t5.out;
  EXPECT_EQ(IdLines(clip.out), std::vector<std::vector<int64_t>>{
                                   Row(*(*run)->Get("text/clip_input_ids"), 0)});
  EXPECT_EQ(IdLines(t5.out), std::vector<std::vector<int64_t>>{
                                 Row(*(*run)->Get("text/t5_input_ids"), 0)});
}

TEST(CliTest, TokenizeErrors) {
  const std::string dir = GoldenDir() + "/conditioning/tokenizers";
  Result no_dir = RunCli("tokenize 'a cat'");
  EXPECT_EQ(no_dir.exit_code, 1);
  EXPECT_THAT(no_dir.out, HasSubstr("--tokenizer"));
  Result no_text = RunCli("tokenize --tokenizer " + dir + "/clip_tokenizer");
  EXPECT_EQ(no_text.exit_code, 1);
  EXPECT_THAT(no_text.out, HasSubstr("TEXT"));
  Result clip_length =
      RunCli("tokenize --tokenizer " + dir + "/clip_tokenizer --max_sequence_length 32 'a cat'");
  EXPECT_EQ(clip_length.exit_code, 1);
  EXPECT_THAT(clip_length.out, HasSubstr("--max_sequence_length"));
  Result missing = RunCli("tokenize --tokenizer " + dir + "/absent 'a cat'");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.out, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(missing.out, HasSubstr(dir + "/absent"));
}

// generate --pipeline: every golden pipeline case whose scheduler is its folder's own, through the
// parity path (IN: noise + embeddings; OUT: latents + image), within the README's tolerance.
TEST(CliTest, GeneratePipelineOfflineReproducesTheGoldenPipelines) {
  TempDir tmp;
  const fs::path dir = test::PipelineDir();
  const nlohmann::json cases = test::ReadJson(dir / "cases.json")["cases"];
  int checked = 0;
  for (const std::string& name : test::CaseNames(dir)) {
    const nlohmann::json& c = cases[name];
    const fs::path folder = dir / c["pipeline_folder"].get<std::string>();
    const nlohmann::json own = test::ReadJson(folder / "scheduler" / "scheduler_config.json");
    const nlohmann::json used = test::ReadJson(dir / c["scheduler_config_file"].get<std::string>());
    if (own["shift"] != used["shift"] || own["use_dynamic_shifting"] != used["use_dynamic_shifting"]) {
      continue;  // run with another scheduler than the folder's: not what the folder generates
    }
    SCOPED_TRACE(name);
    auto golden = LoadSafetensorsWeights((dir / c["file"].get<std::string>()).string());
    ASSERT_TRUE(golden.ok()) << golden.status();
    std::vector<std::pair<std::string, torch::Tensor>> in = {
        {"noise", golden->at("inputs/latents_unpacked")},
        {"inputs/prompt_embeds", golden->at("inputs/prompt_embeds")},  // prefixed spelling
        {"pooled_prompt_embeds", golden->at("inputs/pooled_prompt_embeds")}};
    for (const char* negative : {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}) {
      const std::string key = std::string("inputs/") + negative;
      if (golden->count(key) > 0) in.emplace_back(negative, golden->at(key));
    }
    const std::string in_path = tmp.File(name + "_in.safetensors");
    ASSERT_TRUE(WriteSafetensors(in_path, in).ok());
    std::string args = "generate --pipeline " + folder.string() + " --inputs " + in_path +
                       " --width " + std::to_string(c["width"].get<int64_t>()) + " --height " +
                       std::to_string(c["height"].get<int64_t>()) + " --steps " +
                       std::to_string(c["num_inference_steps"].get<int64_t>()) + " --guidance " +
                       std::to_string(c["guidance_scale"].get<double>()) + " --threads 1";
    const nlohmann::json& extra = c["extra_call_kwargs"];
    if (extra.contains("num_images_per_prompt")) {
      args += " --num-images " + std::to_string(extra["num_images_per_prompt"].get<int64_t>());
    }
    if (extra.contains("true_cfg_scale")) {
      args += " --true-cfg-scale " + std::to_string(extra["true_cfg_scale"].get<double>());
    }
    const std::string out_path = tmp.File(name + "_out.safetensors");
    Result r = RunCli(args + " -o " + out_path);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    auto out = LoadSafetensorsWeights(out_path);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(test::WithinTolerance(out->at("latents"), golden->at("final/latents_unpacked")));
    EXPECT_TRUE(test::WithinTolerance(out->at("image"), golden->at("final/image")));
    ++checked;

    if (name == "dev_dynamic_n2") {
      // The same run as a PNG: the golden 8-bit image within one level.
      const std::string png_path = tmp.File(name + ".png");
      Result p = RunCli(args + " -o " + png_path);
      ASSERT_EQ(p.exit_code, 0) << p.out;
      std::ifstream f(png_path, std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      auto rgb = DecodePng(bytes);
      ASSERT_TRUE(rgb.ok()) << rgb.status();
      torch::Tensor expected = golden->at("final/image_uint8")[0];
      if (expected.size(0) == 3) expected = expected.permute({1, 2, 0});
      EXPECT_LE((rgb->to(torch::kInt) - expected.to(torch::kInt)).abs().max().item<int>(), 1);
    }
  }
  EXPECT_GE(checked, 3);
}

// write-demo writes the embedded flux-tiny pipeline; generate --pipeline runs it on its own example
// inputs; bad invocations fail with exit code 1 and a reason.
TEST(CliTest, WriteDemoThenGenerateOffline) {
  TempDir tmp;
  Result w = RunCli("write-demo -o " + tmp.path() + " --threads 1");
  ASSERT_EQ(w.exit_code, 0) << w.out;
  EXPECT_THAT(w.out, HasSubstr("single file (transformer)"));
  const std::string pipeline = tmp.path() + "/flux-tiny/pipeline";
  const std::string examples = tmp.path() + "/flux-tiny/example_inputs.safetensors";
  Result again = RunCli("write-demo flux-tiny -o " + tmp.path() + " --threads 1");
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_THAT(again.out, HasSubstr("verified existing"));

  const std::string png = tmp.File("tiny.png");
  Result g = RunCli("generate --pipeline " + pipeline + " --inputs " + examples +
                    " --width 64 --height 32 --steps 2 --seed 3 --num-images 2 -o " + png +
                    " --threads 1");
  ASSERT_EQ(g.exit_code, 0) << g.out;
  for (const std::string& path : {png, tmp.File("tiny_1.png")}) {
    std::ifstream f(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto rgb = DecodePng(bytes);
    ASSERT_TRUE(rgb.ok()) << path << ": " << rgb.status();
    EXPECT_THAT(rgb->sizes().vec(), ::testing::ElementsAre(32, 64, 3));
  }

  Result odd = RunCli("generate --pipeline " + pipeline + " --inputs " + examples +
                      " --width 65 --height 32 --steps 2 -o " + png + " --threads 1");
  EXPECT_EQ(odd.exit_code, 1);
  EXPECT_THAT(odd.out, HasSubstr("INVALID_ARGUMENT"));
  Result no_inputs = RunCli("generate --pipeline " + pipeline + " -o " + png + " --threads 1");
  EXPECT_EQ(no_inputs.exit_code, 1);
  EXPECT_THAT(no_inputs.out, HasSubstr("--inputs"));
  Result bad_out = RunCli("generate --pipeline " + pipeline + " --inputs " + examples + " -o " +
                          tmp.File("x.jpg") + " --threads 1");
  EXPECT_EQ(bad_out.exit_code, 1);
  EXPECT_THAT(bad_out.out, HasSubstr(".png"));
  Result no_prompt = RunCli("generate --pipeline " + pipeline + " --inputs " + png +
                            " -o " + tmp.File("y.png") + " --threads 1");
  EXPECT_EQ(no_prompt.exit_code, 1);
  Result unknown = RunCli("write-demo flux-huge -o " + tmp.path());
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.out, HasSubstr("flux-tiny"));
}

// --- encode-prompt ---

// The golden text-pipeline folder (pipeline/flux_pipeline_text/flux_tiny, a complete FluxPipeline
// folder with CLIP and T5) and its cases (prompt, optional prompt_2, golden file).
struct TextCase {
  std::string name;
  std::string prompt;
  std::optional<std::string> prompt_2;
  TensorMap golden;
};

std::string TextPipelineFolder() { return (test::TextPipelineDir() / "flux_tiny").string(); }

std::vector<TextCase> TextCases() {
  std::vector<TextCase> out;
  const nlohmann::json cases = test::ReadJson(test::TextPipelineDir() / "cases.json")["cases"];
  for (const auto& [name, c] : cases.items()) {
    TextCase t;
    t.name = name;
    const nlohmann::json& kwargs = c["call_kwargs"];
    t.prompt = kwargs["prompt"].get<std::string>();
    if (kwargs.contains("prompt_2")) t.prompt_2 = kwargs["prompt_2"].get<std::string>();
    auto golden =
        LoadSafetensorsWeights((test::TextPipelineDir() / c["file"].get<std::string>()).string());
    EXPECT_TRUE(golden.ok()) << name << ": " << golden.status();
    if (golden.ok()) t.golden = *std::move(golden);
    out.push_back(std::move(t));
  }
  return out;
}

// The golden run's max_sequence_length: T5 pads its ids to it.
int64_t GoldenSequenceLength(const TextCase& c) { return c.golden.at("text/t5_input_ids").size(1); }

// encode-prompt reproduces FluxPipeline.encode_prompt of every golden text case: the prompts
// without a prompt_2 in one call (one row each, in order), each prompt_2 case in its own call;
// truncations are reported on stderr and in the metadata.
TEST(CliTest, EncodePromptMatchesTheGoldenTextEncodings) {
  TempDir tmp;
  const std::vector<TextCase> cases = TextCases();
  ASSERT_FALSE(cases.empty()) << "no cases in " << test::TextPipelineDir() / "cases.json";
  const int64_t length = GoldenSequenceLength(cases[0]);
  std::vector<std::vector<const TextCase*>> calls(1);
  for (const TextCase& c : cases) {
    ASSERT_EQ(GoldenSequenceLength(c), length) << c.name;
    if (c.prompt_2.has_value()) {
      calls.push_back({&c});
    } else {
      calls[0].push_back(&c);
    }
  }
  ASSERT_FALSE(calls[0].empty());
  ASSERT_GE(calls.size(), 2u) << "no golden case with a prompt_2";
  int truncating_cases = 0;
  for (size_t k = 0; k < calls.size(); ++k) {
    const std::string out_path = tmp.File("encoded_" + std::to_string(k) + ".safetensors");
    std::string args = "encode-prompt --pipeline " + TextPipelineFolder() +
                       " --max-sequence-length " + std::to_string(length) + " -o " + out_path +
                       " --threads 1";
    const std::optional<std::string>& prompt_2 = calls[k][0]->prompt_2;
    if (prompt_2.has_value()) args += " --prompt_2 " + ShellQuote(*prompt_2);
    std::vector<std::string> names;
    for (const TextCase* c : calls[k]) {
      args += " " + ShellQuote(c->prompt);
      names.push_back(c->name);
    }
    SCOPED_TRACE(absl::StrJoin(names, ", "));
    Result r = RunCli(args);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    auto file = SafetensorsFile::Open(out_path);
    ASSERT_TRUE(file.ok()) << file.status();
    auto embeds = (*file)->Get("prompt_embeds");
    auto pooled = (*file)->Get("pooled_prompt_embeds");
    ASSERT_TRUE(embeds.ok()) << embeds.status();
    ASSERT_TRUE(pooled.ok()) << pooled.status();
    EXPECT_EQ(embeds->scalar_type(), torch::kFloat32);
    EXPECT_EQ(pooled->scalar_type(), torch::kFloat32);
    const int64_t prompts = static_cast<int64_t>(calls[k].size());
    ASSERT_EQ(embeds->size(0), prompts);
    ASSERT_EQ(pooled->size(0), prompts);

    const std::map<std::string, std::string>& meta = (*file)->metadata();
    ASSERT_TRUE(meta.count("prompt") && meta.count("max_sequence_length") &&
                meta.count("truncated_prompts"))
        << "metadata lacks prompt / max_sequence_length / truncated_prompts";
    EXPECT_EQ(meta.at("max_sequence_length"), std::to_string(length));
    const nlohmann::json recorded = nlohmann::json::parse(meta.at("prompt"));
    const nlohmann::json truncated = nlohmann::json::parse(meta.at("truncated_prompts"));
    EXPECT_EQ(meta.count("prompt_2"), prompt_2.has_value() ? 1u : 0u);
    std::set<std::pair<int64_t, std::string>> truncations;  // (prompt index, tokenizer)
    for (const nlohmann::json& t : truncated) {
      truncations.insert({t["index"].get<int64_t>(), t["component"].get<std::string>()});
      EXPECT_GT(t["tokens"].get<int64_t>(), t["max_length"].get<int64_t>()) << t.dump();
    }
    for (int64_t i = 0; i < prompts; ++i) {
      const TextCase& c = *calls[k][i];
      SCOPED_TRACE(c.name);
      EXPECT_EQ(recorded[i].get<std::string>(), c.prompt);
      EXPECT_TRUE(test::WithinTolerance((*embeds)[i], c.golden.at("text/prompt_embeds")[0]));
      EXPECT_TRUE(test::WithinTolerance((*pooled)[i], c.golden.at("text/pooled_prompt_embeds")[0]));
      // The golden README: "long" truncates in both tokenizers; the others fit.
      const bool long_prompt = c.name == "long";
      truncating_cases += long_prompt;
      for (const char* tokenizer : {"tokenizer", "tokenizer_2"}) {
        EXPECT_EQ(truncations.count({i, tokenizer}), long_prompt ? 1u : 0u) << tokenizer;
      }
      if (long_prompt) {
        EXPECT_THAT(r.out, HasSubstr("warning: prompt[" + std::to_string(i) + "]"));
        EXPECT_THAT(r.out, HasSubstr("truncated"));
      }
    }
    EXPECT_EQ(truncations.size(), truncated.size());
  }
  EXPECT_EQ(truncating_cases, 1) << "the golden case 'long' is missing";
}

// The written file is a valid generate --inputs: the same image as generate --prompt with the same
// seed, and, with the golden run's noise added, the golden pipeline output.
TEST(CliTest, EncodePromptOutputGeneratesLikeThePrompt) {
  TempDir tmp;
  const std::vector<TextCase> cases = TextCases();
  ASSERT_FALSE(cases.empty());
  const TextCase& c = cases[0];
  ASSERT_FALSE(c.prompt_2.has_value()) << c.name;
  const torch::Tensor image = c.golden.at("final/image");
  const std::string common =
      " --pipeline " + TextPipelineFolder() + " --max_sequence_length " +
      std::to_string(GoldenSequenceLength(c)) + " --height " + std::to_string(image.size(2)) +
      " --width " + std::to_string(image.size(3)) + " --steps " +
      std::to_string(c.golden.at("sigmas").numel() - 1) + " --guidance " +
      std::to_string(c.golden.at("step/0/guidance_in").flatten()[0].item<double>()) +
      " --threads 1";
  const std::string encoded = tmp.File("encoded.safetensors");
  Result e = RunCli("encode-prompt --pipeline " + TextPipelineFolder() + " --max_sequence_length " +
                    std::to_string(GoldenSequenceLength(c)) + " -o " + encoded + " --threads 1 " +
                    ShellQuote(c.prompt));
  ASSERT_EQ(e.exit_code, 0) << e.out;

  // Same seed: generate --prompt vs generate --inputs (the encodings) give identical results.
  const std::string from_prompt = tmp.File("from_prompt.safetensors");
  const std::string from_inputs = tmp.File("from_inputs.safetensors");
  Result p = RunCli("generate" + common + " --seed 11 --prompt " + ShellQuote(c.prompt) + " -o " +
                    from_prompt);
  ASSERT_EQ(p.exit_code, 0) << p.out;
  Result i = RunCli("generate" + common + " --seed 11 --inputs " + encoded + " -o " + from_inputs);
  ASSERT_EQ(i.exit_code, 0) << i.out;
  EXPECT_THAT(i.out, HasSubstr("prompt_embeds, pooled_prompt_embeds from " + encoded));
  auto a = LoadSafetensorsWeights(from_prompt);
  auto b = LoadSafetensorsWeights(from_inputs);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  for (const char* key : {"latents", "image"}) {
    EXPECT_TRUE(torch::equal(a->at(key), b->at(key)))
        << key << ": max |diff| " << (a->at(key) - b->at(key)).abs().max().item<double>();
  }

  // The golden noise next to the encodings: the golden FluxPipeline(prompt=...) output.
  auto enc = LoadSafetensorsWeights(encoded);
  ASSERT_TRUE(enc.ok()) << enc.status();
  const std::string with_noise = tmp.File("with_noise.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(with_noise, {{"prompt_embeds", enc->at("prompt_embeds")},
                                    {"pooled_prompt_embeds", enc->at("pooled_prompt_embeds")},
                                    {"noise", c.golden.at("inputs/latents_unpacked")}})
          .ok());
  const std::string golden_run = tmp.File("golden_run.safetensors");
  Result g = RunCli("generate" + common + " --inputs " + with_noise + " -o " + golden_run);
  ASSERT_EQ(g.exit_code, 0) << g.out;
  auto out = LoadSafetensorsWeights(golden_run);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(test::WithinTolerance(out->at("latents"), c.golden.at("final/latents_unpacked")));
  EXPECT_TRUE(test::WithinTolerance(out->at("image"), image));
}

TEST(CliTest, EncodePromptErrors) {
  TempDir tmp;
  const std::string folder = TextPipelineFolder();
  const std::string out = tmp.File("out.safetensors");
  auto expect_error = [&](const std::string& args, const std::string& code,
                          const std::vector<std::string>& mentions) {
    SCOPED_TRACE(args);
    Result r = RunCli("encode-prompt " + args + " --threads 1");
    EXPECT_EQ(r.exit_code, 1) << r.out;
    EXPECT_THAT(r.out, HasSubstr(code));
    for (const std::string& m : mentions) EXPECT_THAT(r.out, HasSubstr(m));
    EXPECT_FALSE(fs::exists(out)) << "written despite the error";
  };
  // A pipeline folder without text encoders (the golden embeddings-only FluxPipeline).
  const std::string no_encoders = (test::PipelineDir() / "dev").string();
  expect_error("--pipeline " + no_encoders + " -o " + out + " 'a cat'", "FAILED_PRECONDITION",
               {no_encoders, "text_encoder", "tokenizer"});
  expect_error("--pipeline " + folder + " --max_sequence_length -1 -o " + out + " 'a cat'",
               "INVALID_ARGUMENT", {"--max_sequence_length", "-1"});
  expect_error("--pipeline " + folder + " --max_sequence_length 100000 -o " + out + " 'a cat'",
               "INVALID_ARGUMENT", {"--max_sequence_length 100000", "limit"});
  expect_error("--pipeline " + folder + " 'a cat'", "INVALID_ARGUMENT", {"-o"});
  expect_error("--pipeline " + folder + " -o " + tmp.File("out.png") + " 'a cat'",
               "INVALID_ARGUMENT", {".safetensors"});
  expect_error("--pipeline " + folder + " -o " + out, "INVALID_ARGUMENT", {"TEXT"});
  expect_error("-o " + out + " 'a cat'", "INVALID_ARGUMENT", {"--pipeline"});
  expect_error("--pipeline " + tmp.File("absent") + " -o " + out + " 'a cat'", "NOT_FOUND",
               {tmp.File("absent")});
  // Unwritable outputs: a missing folder, a folder named like the file, a folder that cannot take
  // files (/proc refuses new entries, even to root).
  const std::string missing = tmp.File("absent") + "/out.safetensors";
  expect_error("--pipeline " + folder + " -o " + missing + " 'a cat'", "NOT_FOUND",
               {missing, "does not exist"});
  fs::create_directory(tmp.File("dir.safetensors"));
  expect_error("--pipeline " + folder + " -o " + tmp.File("dir.safetensors") + " 'a cat'",
               "INVALID_ARGUMENT", {tmp.File("dir.safetensors"), "folder"});
  Result proc = RunCli("encode-prompt --pipeline " + folder +
                       " -o /proc/ds_encode_prompt_test.safetensors 'a cat' --threads 1");
  EXPECT_EQ(proc.exit_code, 1) << proc.out;
  EXPECT_THAT(proc.out, HasSubstr("-o /proc/ds_encode_prompt_test.safetensors"));
  EXPECT_THAT(proc.out, ::testing::Not(HasSubstr("wrote")));
}

}  // namespace
}  // namespace ds
