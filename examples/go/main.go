package main

// moex from Go: open the demo model, run a layer and a whole step, compare with the C example's
// reference, read statistics and the routing trace.
// usage: moex_example_go <model dir> <reference file from examples/c>

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
)

const tokens = 4

// Same library, same inputs, one thread: identical results expected; float noise allowed only.
const relTol = 1e-5

func readReference(path string) (int, []float32, []float32, []float32, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, nil, nil, nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<26)
	var lines [][]string
	for sc.Scan() {
		lines = append(lines, strings.Fields(sc.Text()))
	}
	if len(lines) != 4 || len(lines[0]) != 4 || lines[0][0] != "moex-ref" || lines[0][1] != "2" {
		return 0, nil, nil, nil, fmt.Errorf("%s: not a moex reference file", path)
	}
	hidden, _ := strconv.Atoi(lines[0][3])
	parse := func(row []string) []float32 {
		out := make([]float32, len(row))
		for i, v := range row {
			x, _ := strconv.ParseFloat(v, 32)
			out[i] = float32(x)
		}
		return out
	}
	return hidden, parse(lines[1]), parse(lines[2]), parse(lines[3]), nil
}

func maxRelDiff(got, want []float32) float64 {
	scale, worst := 0.0, 0.0
	for i := range want {
		scale = math.Max(scale, math.Abs(float64(want[i])))
		worst = math.Max(worst, math.Abs(float64(got[i])-float64(want[i])))
	}
	if len(got) != len(want) || scale == 0 {
		return math.Inf(1)
	}
	return worst / scale
}

func run(modelDir, refPath string) (bool, error) {
	number, text := Version()
	fmt.Printf("moex %s (%d) via cgo\n", text, number)
	hidden, refLayer0, refStep, refAdaptive, err := readReference(refPath)
	if err != nil {
		return false, err
	}
	model, err := OpenModel(modelDir)
	if err != nil {
		return false, err
	}
	defer model.Close()
	info, err := model.Info()
	if err != nil {
		return false, err
	}
	fmt.Printf("model: %d layers x %d experts, top-%d, hidden %d\n", info.n_layers, info.n_experts, info.top_k, info.hidden)
	x := make([]float32, tokens*hidden)
	for t := 0; t < tokens; t++ {
		for i := 0; i < hidden; i++ {
			x[t*hidden+i] = float32((t*131+i*31)%97)/48.5 - 1.0
		}
	}
	ex, err := NewExecutor(model, 6*uint64(info.expert_bytes), 2 /* LFU */, 1)
	if err != nil {
		return false, err
	}
	defer ex.Close()
	if err := ex.RecordTrace(true); err != nil {
		return false, err
	}
	layer0, err := ex.Forward(0, x)
	if err != nil {
		return false, err
	}
	step, err := ex.Step(x)
	if err != nil {
		return false, err
	}
	d0, d1 := maxRelDiff(layer0, refLayer0), maxRelDiff(step, refStep)
	fmt.Printf("max relative difference to the C reference: layer 0 %.3g, step %.3g\n", d0, d1)
	st, err := ex.Stats()
	if err != nil {
		return false, err
	}
	js, err := ex.StatsJSON()
	if err != nil {
		return false, err
	}
	var parsed map[string]interface{}
	if err := json.Unmarshal([]byte(js), &parsed); err != nil {
		return false, err
	}
	fmt.Printf("stats: %d hits, %d misses, hit rate %.2f\n", st.hits, st.misses, float64(st.hit_rate))
	t, l, k, err := ex.TraceShape()
	if err != nil {
		return false, err
	}
	fmt.Printf("trace: %d tokens x %d layers x top-%d\n", t, l, k)
	if _, err := OpenModel(modelDir + "/does-not-exist"); err == nil {
		return false, nil
	} else {
		fmt.Printf("expected error: %v\n", err)
	}
	// The adaptive gate with speculative prefetching, as the C example configures it.
	ad, err := NewExecutorWith(model, ExecutorOptions{CacheBytes: 6 * uint64(info.expert_bytes), Eviction: 2, /* LFU */
		Threads: 1, Gating: 2 /* ADAPTIVE */, GateThreshold: 0.05, Prediction: 2 /* SPECULATIVE */, PrefetchDepth: 1})
	if err != nil {
		return false, err
	}
	defer ad.Close()
	astep, err := ad.Step(x)
	if err != nil {
		return false, err
	}
	ast, err := ad.Stats()
	if err != nil {
		return false, err
	}
	d2 := maxRelDiff(astep, refAdaptive)
	fmt.Printf("adaptive + speculative: difference to C %.3g, %d skipped, %d prefetches, recall %.2f\n", d2,
		ast.skipped, ast.prefetches, float64(ast.recall))
	_, hasTotal := parsed["total"]
	return d0 <= relTol && d1 <= relTol && d2 <= relTol && ast.prefetches > 0 && st.hits+st.misses > 0 && hasTotal && t >= tokens, nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: moex_example_go <model dir> <reference file>")
		os.Exit(2)
	}
	ok, err := run(os.Args[1], os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "moex_example_go:", err)
		os.Exit(1)
	}
	if !ok {
		fmt.Println("FAILED")
		os.Exit(1)
	}
	fmt.Println("OK")
}
