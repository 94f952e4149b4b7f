// Package main holds a small Go wrapper over moex's C API (cgo) and an example using it.
// Build against an installed moex: CGO_CFLAGS=-I<prefix>/include CGO_LDFLAGS="-L<prefix>/lib -Wl,-rpath,<prefix>/lib".
package main

/*
#cgo LDFLAGS: -lmoex
#include <stdlib.h>
#include <moex.h>
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Error is a failed moex call: the status code and the library's message.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", C.GoString(C.moex_status_string(C.moex_status(e.Status))), e.Message)
}

// check turns a status into an error. The message is thread-local in C, so callers hold the OS
// thread (runtime.LockOSThread) across the call and the check.
func check(s C.moex_status) error {
	if s == C.MOEX_OK {
		return nil
	}
	return &Error{Status: int(s), Message: C.GoString(C.moex_last_error_message())}
}

// call runs f on a locked OS thread so that the thread-local error message belongs to it.
func call(f func() C.moex_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return check(f())
}

// Version returns the library's version number and text.
func Version() (uint32, string) {
	return uint32(C.moex_version_number()), C.GoString(C.moex_version_string())
}

// Model is an opened checkpoint. Close it (a finalizer is the fallback).
type Model struct{ raw *C.moex_model }

// OpenModel opens a safetensors file or folder, or a .gguf file.
func OpenModel(path string) (*Model, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var raw *C.moex_model
	if err := call(func() C.moex_status { return C.moex_model_open(cpath, nil, nil, nil, &raw) }); err != nil {
		return nil, err
	}
	m := &Model{raw}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// Close destroys the model (idempotent).
func (m *Model) Close() {
	if m.raw != nil {
		C.moex_model_destroy(m.raw)
		m.raw = nil
	}
}

// Info returns the model's shape.
func (m *Model) Info() (C.moex_model_info, error) {
	var info C.moex_model_info
	C.moex_model_info_init(&info)
	err := call(func() C.moex_status { return C.moex_model_get_info(m.raw, &info) })
	return info, err
}

// Executor runs a model's MoE layers; not safe for concurrent use.
type Executor struct {
	raw    *C.moex_executor
	hidden int
}

// ExecutorOptions chooses an executor's policies (zero = library default for each field; the
// constants are moex.h's MOEX_EVICTION_*, MOEX_GATING_*, MOEX_PREDICTION_*).
type ExecutorOptions struct {
	CacheBytes    uint64
	Eviction      int32
	Threads       uint32
	Gating        int32
	GateThreshold float64
	Prediction    int32
	PrefetchDepth uint32
}

// NewExecutor creates an executor (0 = library default for each argument).
func NewExecutor(m *Model, cacheBytes uint64, eviction int32, threads uint32) (*Executor, error) {
	return NewExecutorWith(m, ExecutorOptions{CacheBytes: cacheBytes, Eviction: eviction, Threads: threads})
}

// NewExecutorWith creates an executor with the given policies.
func NewExecutorWith(m *Model, o ExecutorOptions) (*Executor, error) {
	info, err := m.Info()
	if err != nil {
		return nil, err
	}
	var p C.moex_executor_params
	C.moex_executor_params_init_size(&p, C.uint64_t(unsafe.Sizeof(p)))
	p.cache_bytes = C.uint64_t(o.CacheBytes)
	p.eviction = C.int32_t(o.Eviction)
	p.threads = C.uint32_t(o.Threads)
	p.gating = C.int32_t(o.Gating)
	p.gate_threshold = C.double(o.GateThreshold)
	p.prediction = C.int32_t(o.Prediction)
	p.prefetch_depth = C.uint32_t(o.PrefetchDepth)
	var raw *C.moex_executor
	if err := call(func() C.moex_status { return C.moex_executor_create(m.raw, &p, &raw) }); err != nil {
		return nil, err
	}
	e := &Executor{raw, int(info.hidden)}
	runtime.SetFinalizer(e, (*Executor).Close)
	return e, nil
}

// Close destroys the executor (idempotent).
func (e *Executor) Close() {
	if e.raw != nil {
		C.moex_executor_destroy(e.raw)
		e.raw = nil
	}
}

func (e *Executor) rows(n int) (int, error) {
	if n == 0 || n%e.hidden != 0 {
		return 0, &Error{Status: -1, Message: fmt.Sprintf("length %d is not a positive multiple of hidden %d", n, e.hidden)}
	}
	return n / e.hidden, nil
}

// Forward returns the MoE output of one layer.
func (e *Executor) Forward(layer uint32, hidden []float32) ([]float32, error) {
	n, err := e.rows(len(hidden))
	if err != nil {
		return nil, err
	}
	out := make([]float32, len(hidden))
	err = call(func() C.moex_status {
		return C.moex_executor_forward_f32(e.raw, C.uint32_t(layer), (*C.float)(&hidden[0]), C.size_t(n), (*C.float)(&out[0]))
	})
	return out, err
}

// Step runs all layers with the residual (h <- h + moe_l(h)) and returns the result.
func (e *Executor) Step(hidden []float32) ([]float32, error) {
	n, err := e.rows(len(hidden))
	if err != nil {
		return nil, err
	}
	out := make([]float32, len(hidden))
	err = call(func() C.moex_status {
		return C.moex_executor_step_f32(e.raw, (*C.float)(&hidden[0]), C.size_t(n), (*C.float)(&out[0]))
	})
	return out, err
}

// RecordTrace starts or stops recording the routing.
func (e *Executor) RecordTrace(on bool) error {
	var v C.uint32_t
	if on {
		v = 1
	}
	return call(func() C.moex_status { return C.moex_executor_record_trace(e.raw, v) })
}

// TraceShape returns the recorded trace's tokens, layers and top_k.
func (e *Executor) TraceShape() (uint64, uint32, uint32, error) {
	var tr *C.moex_trace
	if err := call(func() C.moex_status { return C.moex_executor_get_trace(e.raw, &tr) }); err != nil {
		return 0, 0, 0, err
	}
	defer C.moex_trace_destroy(tr)
	var t C.uint64_t
	var l, k C.uint32_t
	err := call(func() C.moex_status { return C.moex_trace_shape(tr, &t, &l, &k, nil) })
	return uint64(t), uint32(l), uint32(k), err
}

// Stats returns the counters summed over layers.
func (e *Executor) Stats() (C.moex_stats, error) {
	var s C.moex_stats
	C.moex_stats_init_size(&s, C.uint64_t(unsafe.Sizeof(s)))
	err := call(func() C.moex_status { return C.moex_executor_get_stats(e.raw, C.MOEX_ALL_LAYERS, &s) })
	return s, err
}

// StatsJSON returns the statistics as JSON.
func (e *Executor) StatsJSON() (string, error) {
	var need C.size_t
	if err := call(func() C.moex_status { return C.moex_executor_stats_json(e.raw, nil, 0, &need) }); err != nil {
		return "", err
	}
	buf := make([]byte, int(need)+1)
	err := call(func() C.moex_status {
		return C.moex_executor_stats_json(e.raw, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), nil)
	})
	return string(buf[:need]), err
}
