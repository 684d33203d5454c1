/* One-core harness for the AMX bf16 products (issue 18): times one NT or NN
 * call of the shape of one task, with the weights (and activations) rotated
 * over `copies` buffers so that they come cold from memory, and prints the
 * best and mean times, GFLOP/s and a hash of C (the bits, to compare builds).
 *
 *   I=ktsft/_kernels; gcc -O3 -std=gnu11 -fno-math-errno -mavx2 -mfma -mf16c \
 *     -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mamx-tile -mamx-bf16 \
 *     -I$I/include -I$I/src -DSRC="\"$PWD/$I/src/kernels_amx.c\"" bench/amx_gemm.c -o /tmp/amx_gemm
 *   taskset -c 1 /tmp/amx_gemm NN M N K [reps [copies]]   (NN: 1 = NN, 0 = NT)
 *
 * NT: C[M, N] = A[M, K] W[N, K]^T; NN: C[M, N] = A[M, K] W[K, N]; both with a
 * rank-16 fp32 LoRA term, as the layer's calls have.  Task shapes of the
 * layers: DeepSeek-V3 gate/up NT 256 256 7168, down NT 256 256 2048, dh NN
 * 256 1024 7168, dx NN 256 1024 2048; Qwen3-30B-A3B T=2048 (128 pairs per
 * expert) gate/up NT 128 256 2048, dh NN 128 768 2048, dx NN 128 1024 768. */
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include SRC
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static uint64_t hsh(const float*c,int64_t n){uint64_t h=1469598103934665603ull;for(int64_t i=0;i<n;++i){uint32_t u;memcpy(&u,c+i,4);h=(h^u)*1099511628211ull;}return h;}
int main(int argc,char**argv){
  syscall(SYS_arch_prctl,0x1023,18);
  int nn=atoi(argv[1]); int64_t M=atol(argv[2]),N=atol(argv[3]),K=atol(argv[4]); int reps=argc>5?atoi(argv[5]):20;
  int64_t r=16; int nw=argc>6?atoi(argv[6]):8; /* weight copies rotated: cold weights */
  int64_t wrows = nn? K : N, wcols = nn? N : K;  /* nn: W[O=K][N]; nt: W[N][K] */
  size_t wel=(size_t)wrows*wcols;
  ktsft_bf16 *W=aligned_alloc(64,wel*2*nw); for(size_t i=0;i<wel*nw;++i) W[i]=0x3f80+(i*7%61)-30;
  int64_t acols = K; size_t ael=(size_t)M*acols; ktsft_bf16 *A=aligned_alloc(64,ael*2*nw+64); for(size_t i=0;i<ael*nw;++i)A[i]=0x3f00+(i*13%37);
  float *A2=aligned_alloc(64,M*r*4); for(int64_t i=0;i<M*r;++i)A2[i]=0.01f*(i%7);
  float *W2=aligned_alloc(64,(nn? r*N : N*r)*4+64); for(int64_t i=0;i<(nn?r*N:N*r);++i)W2[i]=0.02f*(i%5);
  float *C=aligned_alloc(64,M*N*4+64); memset(C,0,M*N*4);
  const ktsft_kernels *kt=ktsft_kernels_amx();
  ktsft_gemm g={0}; g.M=M;g.N=N;g.K=K;g.A=A;g.lda=acols;g.ldw=wcols;g.K2=r;g.A2=A2;g.lda2=r;g.W2=W2;g.ldw2=nn?N:r;g.C=C;g.ldc=N;
  double best=1e9,tot=0;
  for(int i=0;i<reps+2;++i){ g.W=W+(size_t)(i%nw)*wel; g.A=A+(size_t)(i%nw)*ael; double t=now(); (nn?kt->nn[1]:kt->nt[1])(&g); t=now()-t; if(i>=2){tot+=t; if(t<best)best=t;} }
  g.W=W; g.A=A; (nn?kt->nn[1]:kt->nt[1])(&g);
  double fl=2.0*M*N*K;
  printf("%s M=%ld N=%ld K=%ld best %.3f ms (%.0f GF/s) mean %.3f ms hash %016lx\n",nn?"NN":"NT",M,N,K,best*1e3,fl/best*1e-9,tot/reps*1e3,hsh(C,M*N));
}
